"""Tests for jaxclip.tokenizer that need neither torch nor open_clip.

CLIP ids are checked against known answers (outputs recorded from open_clip 3.3.0's
SimpleTokenizer); tests/test_tokenizer_parity.py compares with open_clip itself where it is
installed. SentencePiece and HF tokenizer.json files are built here, offline.
"""

import concurrent.futures
import html
import io
import multiprocessing
import pickle
import random
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from jaxclip import tokenizer as T

SOT, EOT = 49406, 49407


def clip_ids(text, context_length=77, **kwargs):
    """The unpadded ids of one text (SOT ... EOT)."""
    row = T.ClipTokenizer(context_length, **kwargs)(text)[0]
    return row[: int(np.argmax(row == EOT)) + 1].tolist()


@pytest.fixture(scope="module")
def clip():
    return T.ClipTokenizer()


# ----------------------------------------------------------------------------- CLIP


def test_clip_known_answers(clip):
    out = clip(["a photo of a sneaker", "a diagram"])
    assert out.dtype == np.int32 and out.shape == (2, 77)
    assert out[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 24781, EOT]
    assert out[1, :4].tolist() == [SOT, 320, 22697, EOT]
    assert not out[0, 7:].any() and not out[1, 4:].any()


def test_clip_attributes(clip):
    assert (clip.vocab_size, clip.pad_id, clip.eot_id, clip.sot_id) == (49408, 0, EOT, SOT)
    assert clip.context_length == 77
    assert clip.config() == {"kind": "clip", "context_length": 77, "fix_text": True}


def test_clip_input_forms(clip):
    single = clip("a photo of a sneaker")
    assert single.shape == (1, 77)
    text = "a photo of a sneaker"
    for texts in ([text], (text,), np.array([text]), (t for t in [text])):
        np.testing.assert_array_equal(clip(texts), single)
    empty = clip([])
    assert empty.shape == (0, 77) and empty.dtype == np.int32
    assert clip("")[0, :3].tolist() == [SOT, EOT, 0]


def test_clip_context_lengths(clip):
    assert clip("a photo of a sneaker", context_length=32).shape == (1, 32)
    short = T.ClipTokenizer(context_length=32)
    assert short.context_length == 32 and short("a diagram").shape == (1, 32)
    np.testing.assert_array_equal(short("a diagram"), clip("a diagram")[:, :32])
    assert short("a diagram", context_length=77).shape == (1, 77)
    # The smallest length keeps only the two specials, as open_clip does.
    assert clip("a photo of a sneaker", context_length=2).tolist() == [[SOT, EOT]]


def test_clip_truncation_keeps_eot_last(clip):
    long_text = " ".join(f"word{i}" for i in range(200))
    full = clip(long_text, context_length=1024)[0]
    n = int(np.argmax(full == EOT)) + 1
    assert n > 77
    for length in (77, 16, 3):
        row = clip(long_text, context_length=length)[0]
        assert row[0] == SOT and row[-1] == EOT and row.shape == (length,)
        np.testing.assert_array_equal(row[1:-1], full[1 : length - 1])
    # One token too many for the context: the last content token gives way to EOT.
    fits = clip("a photo of a sneaker", context_length=7)[0]
    assert fits.tolist() == [SOT, 320, 1125, 539, 320, 24781, EOT]
    cut = clip("a photo of a sneaker", context_length=6)[0]
    assert cut.tolist() == [SOT, 320, 1125, 539, 320, EOT]


def test_clip_cleaning_matches_open_clip_rules(clip):
    # html.unescape twice, whitespace collapse (tabs, newlines, NBSP), lowercase.
    same = [
        ("a &amp;amp; b", "a & b"),
        ("<i>a &amp;amp; b</i>", "<i>a & b</i>"),  # "<" stops ftfy's own unescaping
        ("a &amp;amp;amp; b", "a & b"),  # ftfy once, then html.unescape twice
        ("A\tPhoto\n\nof  a\u00a0SNEAKER ", "a photo of a sneaker"),
        ("ΟΔΟΣ", "οδος"),  # str.lower's final sigma, which a per-character lowercase misses
    ]
    for raw, clean in same:
        assert clip.clean(raw) == clean
        np.testing.assert_array_equal(clip(raw), clip(clean))
    assert clip.clean("ΟΔΟΣ") != "οδοσ"
    assert T.ClipTokenizer(fix_text=False).clean("a &amp;amp; b") == "a & b"


def test_clip_ftfy_repairs(clip):
    # Outputs recorded from open_clip 3.3.0's SimpleTokenizer.encode.
    assert clip_ids("cafÃ© au lait") == [SOT, 15304, 2566, 572, 585, EOT]  # mojibake
    assert clip_ids("don’t") == clip_ids("don't") == [SOT, 847, 713, EOT]  # curly quote
    assert clip_ids("A\x0bB") == [SOT, 3937, EOT]  # control character removed, not a space
    # Without ftfy those texts keep their damage.
    assert clip_ids("cafÃ© au lait", fix_text=False) != clip_ids("café au lait")
    assert clip_ids("don’t", fix_text=False) != clip_ids("don't")
    assert T.ClipTokenizer(fix_text=False).config()["fix_text"] is False


def test_clip_ftfy_bypass_is_exact():
    """Text that skips ftfy must clean exactly as if ftfy had run on it."""
    import ftfy  # a runtime dependency of ClipTokenizer, so no skip

    tok = T.ClipTokenizer()

    def reference(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
        return " ".join(text.split()).lower()

    rng = random.Random(0)
    ascii_pool = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n", "\r", "\r\n"]
    words = ["<b>", "'s", "don't", "x" * 40, "  ", "...", "<start_of_text>", "3.14", "\\", '"q"']
    texts = []
    for _ in range(3000):
        n = rng.randint(0, 40)
        texts.append(
            "".join(rng.choice(ascii_pool if rng.random() < 0.8 else words) for _ in range(n))
        )
    # And text that must go through ftfy.
    texts += [
        "&EACUTE;",
        "a &amp;amp; b",
        "\x1b[31mred\x1b[0m",
        "x\x7fy",
        "A\x0bB",
        "ﬁ ＡＢＣ",
        "Ã©",
    ]
    for text in texts:
        assert tok.clean(text) == reference(text), repr(text)


def test_clip_literal_special_strings(clip):
    # open_clip matches its own special strings inside captions (outputs recorded from 3.3.0).
    assert clip_ids("<start_of_text>") == [SOT, SOT, EOT]
    row = clip("x <END_OF_TEXT> y")[0]
    assert row[:5].tolist() == [SOT, 343, EOT, 344, EOT]
    # ...but not when a punctuation run swallows the "<", nor with the "ſ" look-alike,
    # nor OpenAI's spelling of the specials.
    assert clip_ids("!<start_of_text>") == [SOT, 0, 283, 1572, 318, 539, 318, 4160, 285, EOT]
    assert clip_ids("<ſtart_of_text>") == [SOT, 27, 129, 123, 16707, 62, 684, 62, 18169, 285, EOT]
    assert clip_ids("<|startoftext|>") == [SOT, 27, 347, 993, 6659, 4160, 91, 285, EOT]
    # Mixed batches keep every row in place, and truncation still ends on EOT.
    batch = clip(["a diagram", "<start_of_text> a diagram", "a diagram"], context_length=4)
    assert batch.tolist() == [[SOT, 320, 22697, EOT], [SOT, SOT, 320, EOT], [SOT, 320, 22697, EOT]]


def test_clip_case_insensitive_pattern_quirks(clip):
    # "'ſ" is a contraction for open_clip's case-insensitive pattern; U+0345 is dropped.
    assert clip_ids("it'ſ") == [SOT, 585, 6, 129, 379, EOT]
    assert clip_ids("a\u0345b") == clip_ids("a b") == [SOT, 320, 321, EOT]


def test_clip_every_byte_is_in_vocab(clip):
    # No unk token exists; any character must still encode (via its UTF-8 bytes).
    text = "".join(chr(c) for c in range(0x21, 0x800)) + "😀𝒥\U0010fffd"
    out = clip(text, context_length=2048)[0]
    assert out[0] == SOT and EOT in out and (out[1 : int(np.argmax(out == EOT))] < SOT).all()


def test_clip_pickles_as_config(clip):
    blob = pickle.dumps(clip)
    assert len(blob) < 1000  # the vocabulary is rebuilt from the package, not shipped
    clone = pickle.loads(blob)
    assert clone.config() == clip.config()
    texts = ["a photo of a sneaker", "cafÃ© &amp; <start_of_text>", "x" * 500]
    np.testing.assert_array_equal(clone(texts), clip(texts))
    other = pickle.loads(pickle.dumps(T.ClipTokenizer(16, fix_text=False)))
    assert other.config() == {"kind": "clip", "context_length": 16, "fix_text": False}


def test_tokenizers_work_in_spawned_workers(clip, spm_model):
    """Grain sends tokenizers to fresh worker processes; they must rebuild and agree."""
    texts = ["a photo of a sneaker", "cafÃ© au lait", "ΟΔΟΣ"]
    spm_tok = T.SentencePieceTokenizer(spm_model, context_length=12)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        got_clip = pool.submit(clip, texts).result(timeout=120)
        got_spm = pool.submit(spm_tok, texts).result(timeout=120)
    np.testing.assert_array_equal(got_clip, clip(texts))
    np.testing.assert_array_equal(got_spm, spm_tok(texts))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (b"bytes", "decode them first"),
        (["ok", 3], r"texts\[1\] is int"),
        (["ok", None], r"texts\[1\] is NoneType"),
        (42, "got int"),
    ],
)
def test_bad_texts(clip, texts, message):
    with pytest.raises(TypeError, match=message):
        clip(texts)


def test_invalid_unicode_is_named(clip, spm_model, wordpiece):
    # ftfy repairs surrogates (as in open_clip); without it the text cannot be encoded.
    assert clip_ids("a\ud83d\ude00b") == clip_ids("a😀b")
    tokenizers = [
        T.ClipTokenizer(fix_text=False),
        T.SentencePieceTokenizer(spm_model),
        T.HFTokenizer(wordpiece, context_length=8),
    ]
    for tok in tokenizers:
        with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
            tok(["fine", "a\ud800b"])


@pytest.mark.parametrize("length", [1, 0, -5])
def test_clip_context_length_too_small(clip, length):
    with pytest.raises(ValueError, match=f"context_length {length} is too small"):
        clip("a", context_length=length)
    with pytest.raises(ValueError, match="too small"):
        T.ClipTokenizer(context_length=length)


@pytest.mark.parametrize("length", [2.5, "77", True])
def test_context_length_must_be_int(clip, length):
    with pytest.raises(TypeError, match="context_length must be an int"):
        clip("a", context_length=length)


def test_clip_rejects_non_bool_fix_text():
    with pytest.raises(TypeError, match="fix_text must be True or False"):
        T.ClipTokenizer(fix_text="yes")


def test_missing_ftfy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(ImportError, match=r"needs the 'ftfy' package.*fix_text=False"):
        T.ClipTokenizer()
    assert T.ClipTokenizer(fix_text=False)("a diagram")[0, :4].tolist() == [SOT, 320, 22697, EOT]


def test_missing_sentencepiece_is_a_clear_error(monkeypatch, spm_model):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match="needs the 'sentencepiece' package"):
        T.SentencePieceTokenizer(spm_model)


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'; expected one of clip"):
        T.build_tokenizer({"kind": "bpe"})
    with pytest.raises(ValueError, match="unknown tokenizer kind None"):
        T.build_tokenizer({"context_length": 77})
    with pytest.raises(ValueError, match="tokenizer kind 'sentencepiece' needs a 'path'"):
        T.build_tokenizer({"kind": "sentencepiece", "context_length": 64})
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) for tokenizer kind 'clip': lowercase"
    ):
        T.build_tokenizer({"kind": "clip", "lowercase": True})
    missing = tmp_path / "nope.model"
    with pytest.raises(
        FileNotFoundError, match=r"SentencePiece model file not found: .*nope\.model"
    ):
        T.build_tokenizer({"kind": "sentencepiece", "path": missing})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json file not found: .*nope\.json"):
        T.build_tokenizer({"kind": "hf", "path": str(tmp_path / "nope.json")})
    with pytest.raises(TypeError, match="spec must be a mapping, got list"):
        T.build_tokenizer([("kind", "clip")])
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        T.build_tokenizer({"kind": "hf", "path": 3})


def test_build_tokenizer_clip():
    tok = T.build_tokenizer({"kind": "clip", "context_length": 32})
    assert isinstance(tok, T.ClipTokenizer) and tok.context_length == 32 and tok.fix_text
    assert T.build_tokenizer({"kind": "clip"}).context_length == 77
    assert T.build_tokenizer(tok.config()).config() == tok.config()


# ----------------------------------------------------------------------------- SentencePiece

CORPUS = [
    f"{a} photo of {b} {c} {d}"
    for a in ("a", "the", "one")
    for b in ("a", "the", "my")
    for c in ("red", "green", "small", "large", "wooden", "shiny")
    for d in ("dog", "cat", "car", "boat", "house", "tree", "bicycle", "sneaker")
]


def _train_spm(path, **options):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=32, model_type="unigram",
        minloglevel=2, **options,
    )  # fmt: skip
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    # Ids: unk 0, bos 1, eos 2, pad 3 (SentencePiece's default has no pad piece).
    return _train_spm(tmp_path_factory.mktemp("spm") / "tiny.model", pad_id=3)


@pytest.fixture(scope="module")
def spm_processor(spm_model):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(spm_model))


def test_spm_layout(spm_model, spm_processor):
    tok = T.SentencePieceTokenizer(spm_model, context_length=32)
    assert tok.vocab_size == spm_processor.get_piece_size() == 32
    assert (tok.pad_id, tok.eos_id, tok.eot_id) == (3, 2, None)
    texts = ["a photo of a red dog", "the photo of my shiny bicycle", ""]
    out = tok(texts)
    assert out.dtype == np.int32 and out.shape == (3, 32)
    for row, text in zip(out, texts):
        ids = [*spm_processor.encode(text), 2]
        assert len(ids) < 32
        assert row.tolist() == ids + [3] * (32 - len(ids))
    assert tok("a photo of a red dog").shape == (1, 32)
    assert tok([]).shape == (0, 32)


def test_spm_truncation_and_options(spm_model, spm_processor):
    text = "a photo of a red dog " * 10
    ids = spm_processor.encode(text)
    sticky = T.SentencePieceTokenizer(spm_model, context_length=8)(text)[0]
    assert sticky.tolist() == [*ids[:7], 2]
    plain = T.SentencePieceTokenizer(spm_model, context_length=8, add_eos=False)(text)[0]
    assert plain.tolist() == ids[:8]
    no_eos = T.SentencePieceTokenizer(spm_model, context_length=12, add_eos=False, pad_id=0)
    dog = spm_processor.encode("a dog")
    assert no_eos("a dog")[0].tolist() == dog + [0] * (12 - len(dog))
    tok = T.SentencePieceTokenizer(spm_model, context_length=16)
    assert tok("a photo", context_length=4).shape == (1, 4)
    lower = T.SentencePieceTokenizer(spm_model, context_length=16, lowercase=True)
    np.testing.assert_array_equal(lower("A PHOTO of a RED dog"), tok("a photo of a red dog"))
    assert not np.array_equal(tok("A PHOTO of a RED dog"), tok("a photo of a red dog"))


def test_spm_config_and_pickle(spm_model):
    options = {"context_length": 20, "add_eos": False, "pad_id": 0, "lowercase": True}
    tok = T.SentencePieceTokenizer(spm_model, **options)
    cfg = tok.config()
    assert cfg == {
        "kind": "sentencepiece", "path": str(spm_model), "context_length": 20,
        "add_eos": False, "pad_id": 0, "lowercase": True,
    }  # fmt: skip
    rebuilt = T.build_tokenizer(cfg)
    clone = pickle.loads(pickle.dumps(tok))
    texts = ["A Photo of the Tree", "one photo of my large house " * 4]
    for other in (rebuilt, clone):
        assert isinstance(other, T.SentencePieceTokenizer) and other.config() == cfg
        np.testing.assert_array_equal(other(texts), tok(texts))


def test_spm_errors(spm_model, tmp_path):
    no_pad = _train_spm(tmp_path / "nopad.model")
    with pytest.raises(ValueError, match="defines no pad piece; pass pad_id"):
        T.SentencePieceTokenizer(no_pad)
    assert T.SentencePieceTokenizer(no_pad, pad_id=0).pad_id == 0
    no_eos = _train_spm(tmp_path / "noeos.model", eos_id=-1, pad_id=2)
    with pytest.raises(ValueError, match="has no EOS piece; pass add_eos=False"):
        T.SentencePieceTokenizer(no_eos)
    assert T.SentencePieceTokenizer(no_eos, add_eos=False)("a dog")[0, -1] == 2
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"garbage\.model is not a valid SentencePiece model"):
        T.SentencePieceTokenizer(garbage)
    with pytest.raises(ValueError, match=r"pad_id 32 is outside the vocabulary \[0, 32\)"):
        T.SentencePieceTokenizer(spm_model, pad_id=32)
    with pytest.raises(TypeError, match="pad_id must be an int"):
        T.SentencePieceTokenizer(spm_model, pad_id="0")
    with pytest.raises(ValueError, match="context_length 1 is too small"):
        T.SentencePieceTokenizer(spm_model, context_length=1)
    single = T.SentencePieceTokenizer(spm_model, context_length=1, add_eos=False)
    assert single("a dog").shape == (1, 1)


# ----------------------------------------------------------------------------- HF tokenizer.json

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "red", "dog", "##s", "cat", "and"]
WP = {w: i for i, w in enumerate(WORDS)}


def _save_wordpiece(path, padding=None, specials=True):
    tok = Tokenizer(models.WordPiece(WP, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", WP["[CLS]"]), ("[SEP]", WP["[SEP]"])]
    )
    if specials:
        tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    if padding is not None:
        tok.enable_padding(pad_id=padding, pad_token=WORDS[padding])
    tok.save(str(path))
    return path


@pytest.fixture
def wordpiece(tmp_path):
    return _save_wordpiece(tmp_path / "tokenizer.json")


def test_hf_wordpiece(wordpiece):
    tok = T.HFTokenizer(wordpiece, context_length=10)
    assert (tok.vocab_size, tok.pad_id, tok.eot_id) == (12, 0, None)
    out = tok(["A Photo of red DOGS", "a cat", "a zebra"])
    assert out.dtype == np.int32
    assert out.tolist() == [
        [2, 4, 5, 6, 7, 8, 9, 3, 0, 0],
        [2, 4, 10, 3, 0, 0, 0, 0, 0, 0],
        [2, 4, 1, 3, 0, 0, 0, 0, 0, 0],
    ]
    # Truncation keeps the template's [SEP]; per-call lengths use their own copy.
    assert tok("a photo of red dogs and cats", context_length=5).tolist() == [[2, 4, 5, 6, 3]]
    assert tok("a cat").shape == (1, 10) and tok([]).shape == (0, 10)


def test_hf_pad_and_eot_options(wordpiece, tmp_path):
    padded = T.HFTokenizer(wordpiece, context_length=6, pad_id=11)
    assert padded("a cat")[0].tolist() == [2, 4, 10, 3, 11, 11]
    from_file = _save_wordpiece(tmp_path / "padded.json", padding=1)
    assert T.HFTokenizer(from_file, context_length=6).pad_id == 1
    tok = T.HFTokenizer(wordpiece, context_length=6, eot_token="[SEP]")
    assert tok.eot_id == 3
    with pytest.raises(ValueError, match=r"eot_token '<eos>' is not in the vocabulary of .*\.json"):
        T.HFTokenizer(wordpiece, eot_token="<eos>")
    no_pad = _save_wordpiece(tmp_path / "nopad.json", specials=False)
    with pytest.raises(ValueError, match=r"nopad\.json sets no padding and has no special"):
        T.HFTokenizer(no_pad)
    with pytest.raises(ValueError, match="pad_id 12 is outside the vocabulary"):
        T.HFTokenizer(wordpiece, pad_id=12)
    with pytest.raises(ValueError, match="context_length 1 is too small for HFTokenizer"):
        T.HFTokenizer(wordpiece, context_length=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"bad\.json is not a valid HF tokenizer\.json"):
        T.HFTokenizer(bad)


def test_hf_config_pickle_and_threads(wordpiece):
    tok = T.HFTokenizer(wordpiece, context_length=8, eot_token="[SEP]")
    cfg = tok.config()
    assert cfg == {
        "kind": "hf", "path": str(wordpiece), "context_length": 8, "pad_id": 0, "eot_token": "[SEP]"
    }  # fmt: skip
    texts = ["a photo of red dogs", "a cat and a dog"]
    for other in (T.build_tokenizer(cfg), pickle.loads(pickle.dumps(tok))):
        assert other.config() == cfg
        np.testing.assert_array_equal(other(texts), tok(texts))
    # Concurrent calls with different lengths must not disturb each other.
    expected = {n: tok(texts, context_length=n) for n in (4, 8, 12)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [(n, pool.submit(tok, texts, n)) for _ in range(50) for n in (4, 8, 12)]
        for n, job in jobs:
            np.testing.assert_array_equal(job.result(), expected[n])
