"""Parity of jaxclip's ClipTokenizer with open_clip's own tokenizer, id for id.

Needs the parity environment (CI's Python 3.11 leg): CPU torch, open-clip-torch 3.3.0
installed with --no-deps, regex and ftfy. Elsewhere the module skips, saying so.

open_clip's package ``__init__`` imports torchvision (for image transforms), which does not
import next to a CPU-only torch (see tests/torch_shim.py). Its ``tokenizer.py`` needs only torch,
ftfy and regex, so it is loaded straight from its file: no torchvision, and no shim.
"""

import importlib.util
import os
import random
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from jaxclip.tokenizer import ClipTokenizer

PARITY_ENV = (
    "parity environment missing: {} (CI installs it on the Python 3.11 leg: "
    "pip install torch==2.13.0 && pip install --no-deps open-clip-torch==3.3.0 && "
    "pip install regex ftfy)"
)


def _load_open_clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(PARITY_ENV.format("open_clip is not installed"), allow_module_level=True)
    for dependency in ("torch", "regex", "ftfy"):
        if importlib.util.find_spec(dependency) is None:
            reason = f"{dependency} (needed by open_clip.tokenizer) is not installed"
            pytest.skip(PARITY_ENV.format(reason), allow_module_level=True)
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    # open_clip sets TOKENIZERS_PARALLELISM=false on import; keep it from leaking into the
    # other tests of this session.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        module_spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return module


open_clip_tokenizer = _load_open_clip_tokenizer()


def reference(texts, context_length):
    return open_clip_tokenizer.tokenize(texts, context_length=context_length).numpy()


def assert_parity(texts, context_length, tok=None):
    tok = tok or ClipTokenizer()
    got = tok(texts, context_length=context_length)
    want = reference(texts, context_length)
    assert got.dtype == np.int32 and got.shape == want.shape
    bad = np.flatnonzero((got != want).any(axis=1))
    detail = [(texts[i], got[i].tolist(), want[i].tolist()) for i in bad[:3]]
    assert bad.size == 0, f"{bad.size} of {len(texts)} rows differ at L={context_length}: {detail}"


HANDPICKED = [
    # prompts with known open_clip ids, and plain prompts
    "a photo of a sneaker",
    "a diagram",
    "A photo of a T-shirt/top.",
    "an ankle boot",
    # empty and blank
    "",
    " ",
    "\t\n \r\n",
    # casing, punctuation, numbers
    "A PHOTO OF A DOG!!!",
    "What?! No... (really) [yes] {maybe} <tag> #hash @user $5 100% 50/50 a_b a-b",
    "1,234.56 and 2026-11-25 at 10:30pm; pi=3.14159, 1e-5, 0x1F, 007",
    "½ ¾ ² ³ Ⅻ ① ٣ ४ 〇",
    "hello.world foo@bar.com https://example.com/a?b=c&d=e",
    # contractions, including curly apostrophes and odd casing
    "I'm sure you're right, it's what we'd've done, they'll see, I've won, don't",
    "DON'T STOP, IT'S FINE",
    "don’t won’t it’s ‘quoted’ “double”",
    "it'ſ o'clock rock'n'roll 'tis",
    # accents, ß, other scripts
    "café naïve résumé Zürich Ærø Łódź São Paulo",
    "Straße STRASSE ß ẞ",
    "ΟΔΟΣ Σίσυφος ΣΑΣ",
    "İstanbul ıi I",
    "東京タワーの夜景 北京 서울의 밤 ภาษาไทย",
    "مرحبا بالعالم שלום עולם",
    "हिन्दी में लिखा है",
    "Привет, мир! Ёлка",
    # emoji, ZWJ sequences, flags, skin tones, variation selectors
    "a dog 🐶 and a cat 🐱",
    "👩‍👩‍👧‍👦 family 👍🏽 🇯🇵 🏳️‍🌈 ❤️ ☺︎",
    "😀😃😄😁😆😅😂🤣",
    # whitespace variety and control characters
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2002en\u3000ideographic\u2028line\u2029para",
    "zero\u200bwidth\u200cjoiner\u200d\ufeffbom",
    "vertical\x0btab\x0cform\x1cfile\x1dgroup\x1erecord\x1funit\x85next",
    "escape \x1b[31mred\x1b[0m delete\x7f nul\x00 bell\x07",
    # HTML entities and markup
    "fish &amp; chips",
    "a &amp;amp; b",
    "a &amp;amp;amp; b",
    "&lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &#x263A; &nbsp;&copy;&EACUTE;",
    "<b>fish &amp;amp; chips</b>",
    "&notanentity; & &#xZZ;",
    # mojibake, width and ligature forms
    "cafÃ© au lait",
    "Ð¡Ð¾Ð±Ð°ÐºÐ°",
    "â€œquotedâ€\x9d and â€™",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "ﬁne ﬂour ﬀ ﬃ",
    "e\u0301 vs é, ㄱ\u314f, \u1100\u1161",
    # combining marks, including U+0345 which open_clip's pattern drops
    "a\u0345b \u0345 ᾳ \u0301 a\u0300\u0301\u0302",
    # special-token strings
    "<|startoftext|> a photo <|endoftext|>",
    "<start_of_text>",
    "<start_of_text> a <end_of_text> b",
    "A <START_OF_TEXT> B",
    "!<start_of_text> x<end_of_text>y",
    "<ſtart_of_text> <end_of_text>>",
    "_of_text> <start_of_tex <end_of_text",
    # long input, beyond the context length
    "a photo of " * 60 + "a sneaker",
    "word " * 500,
    "x" * 2000,
    "supercalifragilisticexpialidocious " * 10,
    "🐶" * 100,
    "9" * 200,
]


@pytest.mark.parametrize("context_length", [77, 32, 7, 2, 256])
def test_handpicked_strings(context_length):
    assert_parity(HANDPICKED, context_length)


def test_one_text_at_a_time_equals_batch():
    tok = ClipTokenizer()
    batch = tok(HANDPICKED)
    for i, text in enumerate(HANDPICKED):
        np.testing.assert_array_equal(tok(text)[0], batch[i])
        np.testing.assert_array_equal(reference(text, 77)[0], batch[i])


def _fuzz_strings(n, seed):
    fragments = [
        *"abcxyzABCXYZ0123456789 \t\n'\"!?.,;:-_()[]{}<>/\\|&#@*+=~`^%$",
        "&amp;", "&lt;", "&#39;", "&nbsp;", "'s", "'ll", "'S", "n't", "’", "“", "”",
        "é", "ß", "İ", "ſ", "Σ", "ς", "東", "京", "한", "ก", "ع", "ह", "\u0301", "\u0345",
        "😀", "🏽", "\u200d", "🇯", "🇵", "\ufe0f", "\u00a0", "\u3000", "\x0b", "\x1c", "\x7f",
        "Ã©", "â€™", "Ð¡", "ﬁ", "Ｆ", "①", "½", "<start_of_text>", "<end_of_text>",
        "<|endoftext|>", "_of_text>",
    ]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choice(fragments) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def test_random_strings():
    texts = _fuzz_strings(3000, seed=1)
    assert_parity(texts, 77)
    assert_parity(texts, 256)


def test_real_prose():
    """Real English text with code, quotes and numbers: the Python docs' help topics."""
    topics = pytest.importorskip("pydoc_data.topics", reason="this Python has no pydoc_data")
    words = " ".join(topics.topics.values()).split(" ")
    rng = random.Random(2)
    texts, i = [], 0
    while i < len(words) and len(texts) < 3000:
        n = rng.randint(3, 40)
        texts.append(" ".join(words[i : i + n]))
        i += n
    assert_parity(texts, 77)


@pytest.mark.slow
def test_every_assigned_code_point():
    """Each code point Python knows, in varied company (letters, digits, punctuation).

    Unassigned code points (category Cn for this Python) are left out: the `regex` module
    may know them from a newer Unicode version than `tokenizers` (module docstring). Of the
    private-use planes only the BMP's area is kept, to bound the run time.
    """
    categories = [unicodedata.category(chr(c)) for c in range(sys.maxunicode + 1)]
    points = [
        chr(c)
        for c, cat in enumerate(categories)
        if cat not in ("Cn", "Cs") and (cat != "Co" or c < 0x10000)
    ]
    # Each point twice in a row, then beside a letter, a digit and punctuation: enough to
    # show which character class the two regex engines put it in.
    texts = []
    for start in range(0, len(points), 32):
        texts.append(" ".join(f"{c}{c}a{c}1!" for c in points[start : start + 32]))
    assert_parity(texts, 1024)
