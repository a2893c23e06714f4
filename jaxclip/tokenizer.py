"""Text tokenizers: turn captions into fixed-length int32 id arrays for the text tower.

Three kinds, all with the same small interface (``__call__``, ``vocab_size``, ``pad_id``,
``eot_id``, ``context_length`` and ``config()``):

* :class:`ClipTokenizer` -- the OpenAI CLIP byte-level BPE (vocabulary vendored in
  ``jaxclip/assets``), producing exactly the ids of open_clip's ``SimpleTokenizer`` /
  ``open_clip.tokenize`` without torch. The BPE itself runs in HF ``tokenizers``
  (Rust, batched); only open_clip's text cleaning stays in Python.
* :class:`SentencePieceTokenizer` -- SigLIP-style towers: no start token, optional EOS,
  configurable pad id, optional lowercasing. Needs the optional ``sentencepiece`` package.
* :class:`HFTokenizer` -- any HF ``tokenizer.json`` (e.g. BERT WordPiece), with the
  file's own normaliser and special-token template.

:func:`build_tokenizer` rebuilds any of them from a ``config()`` mapping. Pickling goes
through the same mapping, so grain worker processes rebuild a tokenizer from its files
instead of receiving megabytes of serialised state.

Known limit of the CLIP parity: open_clip splits words with the ``regex`` module, whose
Unicode tables can be newer than those of ``tokenizers``. Code points that Python's own
``unicodedata`` still lists as unassigned may therefore be split differently. Every
assigned code point, including the quirks of ``regex``'s case-insensitive mode, is
reproduced (tests/test_tokenizer_parity.py checks them all).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import operator
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from jaxclip.config import ConfigError

CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407
CLIP_PAD_ID = 0
CLIP_VOCAB_SIZE = 49408
_CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# open_clip keeps merge lines 1 .. 48894 of the file: the vocabulary is 256 byte symbols,
# their 256 end-of-word variants, the merges and the two special tokens (49408 in all).
_CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2

# open_clip compiles its word pattern with re.IGNORECASE in the `regex` module. On
# lowercased text that flag still matters in two places, reproduced here without a
# case-insensitive pattern (which runs markedly slower in tokenizers): the long s "ſ" folds
# to "s", so "'ſ" is a contraction; and U+0345 folds to a letter, so it matches neither
# the letter class nor the "other" class and is dropped like whitespace.
_CLIP_WORD_PATTERN = r"'[sſ]|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+"
# open_clip's special-token strings are also alternatives of its pattern, so a caption
# that literally contains them gets the special ids. Such captions take a slow path.
_CLIP_LITERAL_SPECIALS = {"<start_of_text>": CLIP_SOT_ID, "<end_of_text>": CLIP_EOT_ID}
_CLIP_SPECIAL_PATTERN = r"<[sſ]tart_of_text>|<end_of_text>|" + _CLIP_WORD_PATTERN
_CLIP_SPECIAL_MARK = "_of_text>"

# Text made only of these characters is returned unchanged by ftfy.fix_text (no mojibake,
# entities, escapes or control characters are possible; "\r" only becomes "\n", which the
# whitespace collapse treats alike), so the ftfy call can be skipped for it. On the 2-core
# CI machine ftfy costs ~25 us of CPU for such a caption and ~85 us for a non-ASCII one,
# more than the BPE itself (~20 us).
_NEEDS_FTFY = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")

_KINDS = ("clip", "sentencepiece", "hf")


class _Tokenizer:
    """Shared call path: input checking, context length and pickling via ``config()``."""

    context_length: int
    vocab_size: int
    pad_id: int
    eot_id: int | None
    _min_length = 1

    def __call__(self, texts: str | Iterable[str], context_length: int | None = None) -> np.ndarray:
        """Tokenize ``texts`` into an int32 array of shape (N, context_length).

        A single string gives shape (1, L). Longer texts are truncated, shorter ones padded
        with ``pad_id``.
        """
        length = (
            self.context_length if context_length is None else self._check_length(context_length)
        )
        return self._encode(_as_text_list(texts), length)

    def _encode(self, texts: list[str], length: int) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _check_length(self, value: Any) -> int:
        if isinstance(value, bool):
            raise TypeError(f"context_length must be an int, got {value!r}")
        try:
            length = operator.index(value)
        except TypeError:
            raise TypeError(f"context_length must be an int, got {type(value).__name__}") from None
        if length < self._min_length:
            raise ValueError(
                f"context_length {length} is too small for {type(self).__name__}: it needs room "
                f"for at least {self._min_length} token(s)"
            )
        return length

    def __reduce__(self):
        return build_tokenizer, (self.config(),)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


def _as_text_list(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError("texts must be str, got bytes: decode them first")
    try:
        out = list(texts)
    except TypeError:
        raise TypeError(
            f"texts must be a str or a sequence of str, got {type(texts).__name__}"
        ) from None
    if not all(isinstance(t, str) for t in out):
        i, bad = next((i, t) for i, t in enumerate(out) if not isinstance(t, str))
        raise TypeError(f"texts[{i}] is {type(bad).__name__}, expected str")
    return out


def _unencodable_text_error(texts: Sequence[str], error: Exception) -> Exception:
    """Name the text behind the opaque TypeError that tokenizers/sentencepiece raise for
    strings that are not valid Unicode (lone surrogates, e.g. from ``surrogateescape``)."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return ValueError(f"texts[{i}] is not valid Unicode and cannot be tokenized: {e}")
    return error


def _pack(
    rows: Sequence[Sequence[int]],
    length: int,
    pad_id: int,
    start_id: int | None = None,
    end_id: int | None = None,
) -> np.ndarray:
    """Lay out ``[start] + row + [end]`` per row in a (N, length) int32 array.

    Rows that do not fit are cut so that ``end_id`` stays the last token, the truncation
    rule of open_clip (and big_vision's "sticky" EOS).
    """
    first = 0 if start_id is None else 1
    room = length - first - (end_id is not None)
    out = np.full((len(rows), length), pad_id, dtype=np.int32)
    if start_id is not None:
        out[:, 0] = start_id
    for i, row in enumerate(rows):
        n = min(len(row), room)
        out[i, first : first + n] = row[:n]
        if end_id is not None:
            out[i, first + n] = end_id
    return out


def _checked_file(path: Any, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def _checked_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _checked_id(value: Any, name: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")
    return int(value)


# --------------------------------------------------------------------------------------
# CLIP BPE


def _byte_symbols() -> list[str]:
    """The 256 characters that stand for bytes (GPT-2/CLIP table), in vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes follow in
    byte order, moved to code points 256 and up so that no symbol is whitespace or a
    control character. The ByteLevel pre-tokenizer of ``tokenizers`` uses the same table.
    """
    kept = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept_set = set(kept)
    moved = [b for b in range(256) if b not in kept_set]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> Tokenizer:
    """The CLIP BPE as a ``tokenizers`` pipeline (no normaliser, no specials); per process.

    Building takes ~0.2 s (mostly gunzip and the merge table), so it is done once and the
    immutable result shared by every ClipTokenizer, including across threads.
    """
    resource = importlib.resources.files("jaxclip") / "assets" / _CLIP_VOCAB_FILE
    lines = gzip.decompress(resource.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1]]
    if len(merges) != _CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{resource} is not the CLIP BPE merge list (expected {_CLIP_NUM_MERGES} pairs)"
        )
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"{resource} gives {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}"
        )
    # No unk token: after byte-level mapping every symbol is in the vocabulary, and an
    # error is better than a silent EOT (the pooling token) in the middle of a caption.
    tok = Tokenizer(
        models.BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="")
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_WORD_PATTERN), "removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


@functools.lru_cache(maxsize=1)
def _clip_special_splitters() -> tuple[Any, Any]:
    split = pre_tokenizers.Split(Regex(_CLIP_SPECIAL_PATTERN), "removed", invert=True)
    return split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _load_fix_text() -> Callable[[str], str]:
    try:
        import ftfy
    except ImportError as e:
        raise ImportError(
            "ClipTokenizer needs the 'ftfy' package to clean text exactly like open_clip "
            "(pip install ftfy); pass fix_text=False to skip ftfy on text known to be clean"
        ) from e
    return ftfy.fix_text


class ClipTokenizer(_Tokenizer):
    """The CLIP BPE tokenizer, id-for-id identical to open_clip's ``SimpleTokenizer``.

    Each row is ``[49406 (SOT), tokens..., 49407 (EOT), 0, ...]``; text longer than the
    context is cut so that EOT stays the last token. Cleaning follows open_clip: ftfy,
    ``html.unescape`` twice, whitespace collapse, lowercase.

    Args:
      context_length: row length (77 for all published CLIP models).
      fix_text: run ``ftfy.fix_text`` (repairs mojibake, curly quotes, full-width forms...).
        False skips it, which changes the ids of text that ftfy would alter; it only
        saves time on text beyond plain printable ASCII, which bypasses ftfy anyway.
    """

    vocab_size = CLIP_VOCAB_SIZE
    pad_id = CLIP_PAD_ID
    eot_id = CLIP_EOT_ID
    sot_id = CLIP_SOT_ID
    _min_length = 2

    def __init__(self, context_length: int = 77, *, fix_text: bool = True):
        self.context_length = self._check_length(context_length)
        self.fix_text = _checked_flag(fix_text, "fix_text")
        self._fix = _load_fix_text() if fix_text else None
        self._bpe = _clip_bpe()

    def config(self) -> dict[str, Any]:
        return {"kind": "clip", "context_length": self.context_length, "fix_text": self.fix_text}

    def clean(self, text: str) -> str:
        """open_clip's ``_clean_lower``: the text the BPE actually sees."""
        if self._fix is not None and _NEEDS_FTFY.search(text) is not None:
            text = self._fix(text)
        text = html.unescape(html.unescape(text))
        return " ".join(text.split()).lower()

    def _encode(self, texts: list[str], length: int) -> np.ndarray:
        cleaned = [self.clean(t) for t in texts]
        try:
            encodings = self._bpe.encode_batch_fast(cleaned, add_special_tokens=False)
        except TypeError as e:
            raise _unencodable_text_error(cleaned, e) from e
        rows = [e.ids for e in encodings]
        for i in [i for i, t in enumerate(cleaned) if _CLIP_SPECIAL_MARK in t]:
            rows[i] = self._encode_with_literal_specials(cleaned[i])
        return _pack(rows, length, CLIP_PAD_ID, start_id=CLIP_SOT_ID, end_id=CLIP_EOT_ID)

    def _encode_with_literal_specials(self, text: str) -> list[int]:
        """Word-by-word encoding for text containing open_clip's special-token strings.

        open_clip maps an exact ``<start_of_text>``/``<end_of_text>`` word to its special
        id, but BPE-encodes any other match of the special alternatives (such as
        "<ſtart_of_text>") as one ordinary word, and never matches a special string that a
        preceding punctuation run swallows. Splitting with the full pattern reproduces all
        three cases.
        """
        split, byte_level = _clip_special_splitters()
        model = self._bpe.model
        ids: list[int] = []
        for word, _ in split.pre_tokenize_str(text):
            special = _CLIP_LITERAL_SPECIALS.get(word)
            if special is not None:
                ids.append(special)
                continue
            for symbols, _ in byte_level.pre_tokenize_str(word):
                ids.extend(t.id for t in model.tokenize(symbols))
        return ids


# --------------------------------------------------------------------------------------
# SentencePiece


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(
            "SentencePieceTokenizer needs the 'sentencepiece' package: "
            "pip install sentencepiece (or jaxclip[sentencepiece])"
        ) from e
    return sentencepiece


class SentencePieceTokenizer(_Tokenizer):
    """A SentencePiece model padded to a fixed length, SigLIP style (no start token).

    Args:
      model_path: the ``.model`` file.
      context_length: row length (64 in SigLIP).
      add_eos: append the model's EOS piece; it is kept as the last token when the text is
        truncated ("sticky" EOS).
      pad_id: padding id; defaults to the model's pad piece (SigLIP's English T5 model pads
        with its EOS, 1, which must then be passed explicitly).
      lowercase: lowercase the text before encoding.

    ``eot_id`` is None: no pooling position is implied; towers pool as they are configured.
    """

    eot_id = None

    def __init__(
        self,
        model_path: str | os.PathLike,
        context_length: int = 64,
        *,
        add_eos: bool = True,
        pad_id: int | None = None,
        lowercase: bool = False,
    ):
        spm = _import_sentencepiece()
        self.path = _checked_file(model_path, "SentencePiece model")
        self.add_eos = _checked_flag(add_eos, "add_eos")
        self.lowercase = _checked_flag(lowercase, "lowercase")
        self._min_length = 1 + add_eos
        self.context_length = self._check_length(context_length)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is not a valid SentencePiece model: {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id() if add_eos else None
        if add_eos and self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {self.path} has no EOS piece; pass add_eos=False"
            )
        if pad_id is None:
            pad_id = self._sp.pad_id()
            if pad_id < 0:
                raise ValueError(
                    f"SentencePiece model {self.path} defines no pad piece; pass pad_id explicitly"
                )
        self.pad_id = _checked_id(pad_id, "pad_id", self.vocab_size)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "sentencepiece",
            "path": self.path,
            "context_length": self.context_length,
            "add_eos": self.add_eos,
            "pad_id": self.pad_id,
            "lowercase": self.lowercase,
        }

    def _encode(self, texts: list[str], length: int) -> np.ndarray:
        if self.lowercase:
            texts = [t.lower() for t in texts]
        try:
            rows = self._sp.encode(texts, out_type=int) if texts else []
        except TypeError as e:
            raise _unencodable_text_error(texts, e) from e
        return _pack(rows, length, self.pad_id, end_id=self.eos_id)


# --------------------------------------------------------------------------------------
# HF tokenizer.json

_CONVENTIONAL_PAD_TOKENS = ("[PAD]", "<pad>")


class HFTokenizer(_Tokenizer):
    """Any HF ``tokenizers`` file (``tokenizer.json``), truncated and padded to a fixed length.

    The file's normaliser, pre-tokeniser and special-token template (e.g. BERT's
    ``[CLS] ... [SEP]``) apply unchanged; truncation keeps the template's tokens.

    Args:
      path: the ``tokenizer.json`` file.
      context_length: row length.
      pad_id: padding id. Defaults to the file's padding setting, else its special
        ``[PAD]`` or ``<pad>`` token; an error if none exists.
      eot_token: the token whose position the text tower pools at, if any (``eot_id``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        context_length: int = 77,
        *,
        pad_id: int | None = None,
        eot_token: str | None = None,
    ):
        self.path = _checked_file(path, "HF tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{self.path} is not a valid HF tokenizer.json: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._min_length = max(1, self._tok.num_special_tokens_to_add(False))
        self.context_length = self._check_length(context_length)
        self.pad_id = _checked_id(self._resolve_pad_id(pad_id), "pad_id", self.vocab_size)
        if eot_token is not None and not isinstance(eot_token, str):
            raise TypeError(f"eot_token must be a str, got {type(eot_token).__name__}")
        self.eot_token = eot_token
        self.eot_id = None if eot_token is None else self._tok.token_to_id(eot_token)
        if eot_token is not None and self.eot_id is None:
            raise ValueError(f"eot_token {eot_token!r} is not in the vocabulary of {self.path}")
        self._by_length: dict[int, Tokenizer] = {}
        self._configured(self.context_length)

    def _resolve_pad_id(self, pad_id: int | None) -> int:
        if pad_id is not None:
            return pad_id
        if self._tok.padding is not None:
            return self._tok.padding["pad_id"]
        for added in self._tok.get_added_tokens_decoder().values():
            if added.special and added.content in _CONVENTIONAL_PAD_TOKENS:
                return self._tok.token_to_id(added.content)
        raise ValueError(
            f"{self.path} sets no padding and has no special [PAD]/<pad> token; pass pad_id"
        )

    def _configured(self, length: int) -> Tokenizer:
        """A private copy truncating and padding to ``length``.

        Copies are never changed after creation, so concurrent calls (grain thread
        prefetch) cannot race on the truncation/padding settings.
        """
        tok = self._by_length.get(length)
        if tok is None:
            tok = Tokenizer.from_str(self._tok.to_str())
            tok.enable_truncation(max_length=length)
            pad_token = self._tok.id_to_token(self.pad_id) or ""
            tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=pad_token)
            self._by_length[length] = tok
        return tok

    def config(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "path": self.path,
            "context_length": self.context_length,
            "pad_id": self.pad_id,
            "eot_token": self.eot_token,
        }

    def _encode(self, texts: list[str], length: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, length), dtype=np.int32)
        try:
            encodings = self._configured(length).encode_batch_fast(texts)
        except TypeError as e:
            raise _unencodable_text_error(texts, e) from e
        return np.array([e.ids for e in encodings], dtype=np.int32)


# --------------------------------------------------------------------------------------
# Factory

_OPTIONS = {
    "clip": {"context_length", "fix_text"},
    "sentencepiece": {"path", "context_length", "add_eos", "pad_id", "lowercase"},
    "hf": {"path", "context_length", "pad_id", "eot_token"},
}


def build_tokenizer(
    spec: Mapping[str, Any],
) -> ClipTokenizer | SentencePieceTokenizer | HFTokenizer:
    """Build a tokenizer from a mapping such as ``{"kind": "clip", "context_length": 77}``.

    ``kind`` is one of "clip", "sentencepiece", "hf"; the last two need ``path``. Other keys
    are the constructor's options; ``tokenizer.config()`` gives a spec that rebuilds it.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"tokenizer spec must be a mapping, got {type(spec).__name__}")
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(_KINDS)}")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        raise ValueError(f"unknown option(s) for tokenizer kind {kind!r}: {', '.join(unknown)}")
    if kind == "clip":
        return ClipTokenizer(**options)
    if "path" not in options:
        raise ValueError(f"tokenizer kind {kind!r} needs a 'path'")
    path = options.pop("path")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, **options)
    return HFTokenizer(path, **options)


def from_config(cfg):
    """The tokenizer a run's config describes (`data.tokenizer`, with the text tower's context
    length); a bad spec is a ConfigError naming `data.tokenizer`."""
    spec = dict(cfg.data.tokenizer)
    spec["context_length"] = cfg.model.text.context_length
    try:
        return build_tokenizer(spec)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from e
