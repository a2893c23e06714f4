"""Emoji images with their CLDR names, from Debian `fonts-noto-color-emoji` + `unicode-data`.

`emoji-test.txt` (Unicode Emoji 15.0) lists every emoji with its status, CLDR name, group and
subgroup. The 3,655 fully-qualified entries are rendered with Noto Color Emoji (Emoji 15.0, the
same coverage) through Pillow:

- caption: the CLDR name ("grinning face", "flag: Wales"); with `captions="templates"`, four
  phrasings of it (`caption_templates`: the name, "an emoji of ...", with its subgroup, with its
  group), for objectives with several positives per image (1-to-K);
- labels: {"group": id, "subgroup": id}, ids numbering the groups/subgroups that have
  fully-qualified emoji in file order (9 groups, 99 subgroups); names are in `meta` and in the
  manifest's `info`;
- image: the glyph drawn at the font's only bitmap size (109) on a 136x128 canvas, padded to a
  136x136 square, composited on a background (white by default) and resized to `image_size`.

Splits are made by *base emoji*: an emoji and its skin-tone variants form one family (same code
points once skin-tone modifiers U+1F3FB..U+1F3FF and U+FE0F are removed, or same CLDR name once
skin-tone qualifiers are removed; see `base_groups`), and a family never straddles train and eval.
The 1,870 families are shuffled with a fixed seed and the first `eval_fraction` of them form the
eval split. With the defaults (eval_fraction 0.2, seed 0) and emoji-test.txt 15.0:
train 2,886 emoji (1,496 families), eval 769 emoji (374 families).

Rendering needs Pillow's raqm layout engine (text shaping): without it flags and ZWJ sequences
come out as several glyphs, so a missing raqm is an error, not a silent degradation.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

from jaxclip.data.sources.common import Record, Skip, shards_for

EMOJI_TEST_FILE = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_FILE = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_SIZE = 109  # Noto Color Emoji is a CBDT bitmap font with a single strike at this size
CANVAS = (136, 128)  # width, height of one glyph at FONT_SIZE
SKIN_TONES = range(0x1F3FB, 0x1F400)
PRESENTATION_SELECTOR = 0xFE0F


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str
    version: str  # e.g. "E1.0"

    @property
    def emoji(self) -> str:
        return "".join(chr(c) for c in self.codepoints)


def parse_emoji_test(path: str = EMOJI_TEST_FILE) -> list[EmojiEntry]:
    """The fully-qualified entries of emoji-test.txt, in file (CLDR) order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; install the Debian package unicode-data "
            "(apt-get install -y unicode-data)"
        )
    entries = []
    group = subgroup = ""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("# group:"):
                group = line.partition(":")[2].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.partition(":")[2].strip()
            elif line and not line.startswith("#"):
                entry = _parse_line(line, group, subgroup, f"{path}:{line_number}")
                if entry is not None:
                    entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no fully-qualified emoji found (is it emoji-test.txt?)")
    return entries


def _parse_line(line: str, group: str, subgroup: str, where: str) -> EmojiEntry | None:
    # <code points> ; <status> # <emoji> E<version> <CLDR name>
    fields, hash_, comment = line.partition("#")
    points, semicolon, status = fields.partition(";")
    _, version, name = [*comment.strip().split(" ", 2), "", ""][:3]
    if not (hash_ and semicolon and version.startswith("E") and name.strip()):
        raise ValueError(f"{where}: malformed emoji-test.txt line: {line!r}")
    try:
        codepoints = tuple(int(p, 16) for p in points.split())
    except ValueError as e:
        raise ValueError(f"{where}: bad code point in {line!r}") from e
    if not codepoints:
        raise ValueError(f"{where}: no code points in {line!r}")
    if status.strip() != "fully-qualified":
        return None
    if not group or not subgroup:
        raise ValueError(f"{where}: emoji before any '# group:'/'# subgroup:' header")
    return EmojiEntry(codepoints, name.strip(), group, subgroup, version)


def base_key(codepoints: Sequence[int]) -> tuple[int, ...]:
    """The code points without skin tones and U+FE0F: equal for an emoji and most variants."""
    return tuple(c for c in codepoints if c not in SKIN_TONES and c != PRESENTATION_SELECTOR)


def base_name(name: str) -> str:
    """The CLDR name without skin-tone qualifiers ("waving hand: dark skin tone" -> "waving hand").

    Mixed-tone couples use other code points than their one-tone forms (handshake 1F91D+tone, but
    1FAF1 1F3FB 200D 1FAF2 1F3FF for two tones), so the name is the second key tying variants to
    their base. "kiss: person, person, <tones>" is the two-tone form of "kiss", so qualifiers
    that are all "person" are dropped as well.
    """
    head, colon, tail = name.partition(": ")
    if not colon:
        return name
    parts = [p for p in tail.split(", ") if not p.endswith("skin tone")]
    if not parts or all(p == "person" for p in parts):
        return head
    return f"{head}: {', '.join(parts)}"


def base_groups(entries: Sequence[EmojiEntry]) -> list[int]:
    """For each entry, the index of its base emoji (the first entry of its variant family).

    Two entries are one family when their `base_key`s or their `base_name`s are equal (union-find
    over both keys); on emoji-test.txt 15.0 that gives 1,870 families, one per emoji without a
    skin tone.
    """
    parent = list(range(len(entries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[Any, int] = {}
    for i, entry in enumerate(entries):
        for key in (base_key(entry.codepoints), base_name(entry.name)):
            j = first_with.setdefault(key, i)
            a, b = find(i), find(j)
            parent[max(a, b)] = min(a, b)  # the family root is its first entry in file order
    return [find(i) for i in range(len(entries))]


def split_entries(
    entries: Sequence[EmojiEntry], eval_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[EmojiEntry]]:
    """{"train": [...], "eval": [...]}, split by base emoji, each in file order."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    families = base_groups(entries)
    bases = sorted(set(families))  # file order of each family's first entry
    random.Random(seed).shuffle(bases)
    eval_bases = set(bases[: round(eval_fraction * len(bases))])
    result: dict[str, list[EmojiEntry]] = {"train": [], "eval": []}
    for entry, family in zip(entries, families):
        result["eval" if family in eval_bases else "train"].append(entry)
    return result


def label_names(entries: Sequence[EmojiEntry]) -> tuple[list[str], list[str]]:
    """(group names, subgroup names) in file order; list positions are the label ids."""
    groups = list(dict.fromkeys(e.group for e in entries))
    subgroups = list(dict.fromkeys(e.subgroup for e in entries))
    return groups, subgroups


def load_font(path: str = FONT_FILE):
    from PIL import ImageFont, features

    if not features.check("raqm"):
        raise RuntimeError(
            "Pillow was built without the raqm layout engine, which emoji rendering needs "
            "(flags and ZWJ sequences would render as several glyphs). Use a Pillow wheel from "
            "PyPI (it bundles raqm) or install libraqm and rebuild Pillow."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; install the Debian package fonts-noto-color-emoji "
            "(apt-get install -y fonts-noto-color-emoji)"
        )
    return ImageFont.truetype(path, size=FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render(emoji: str, font, image_size: int = 64, background: str = "white"):
    """The emoji as a square PIL image (RGB, or RGBA when background is "none").

    Returns a string saying why instead of an image when the font has no single glyph for it.
    """
    from PIL import Image, ImageDraw

    if font.getlength(emoji) > 1.5 * CANVAS[0]:
        return "renders as several glyphs (not in the font as one sequence)"
    glyph = Image.new("RGBA", CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), emoji, font=font, embedded_color=True)
    if glyph.getchannel("A").getbbox() is None:
        return "renders blank (no glyph in the font)"
    side = max(CANVAS)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - CANVAS[0]) // 2, (side - CANVAS[1]) // 2))
    if background != "none":
        # Composite before resizing so edge pixels blend with the background, not with black.
        canvas = Image.new("RGBA", square.size, background)
        square = Image.alpha_composite(canvas, square).convert("RGB")
    return square.resize((image_size, image_size), Image.Resampling.LANCZOS)


CAPTION_KINDS = ("name", "templates")


def caption_templates(entry: EmojiEntry) -> list[str]:
    """Four phrasings of one emoji's name: the bare name, a generic frame, and two that add its
    subgroup or group ("face-smiling" reads "face smiling"), so the captions of one image differ
    in wording and in how much of the category they name."""
    subgroup = entry.subgroup.replace("-", " ")
    return [entry.name, f"an emoji of {entry.name}", f"{entry.name}, a {subgroup} emoji",
            f"{entry.group.lower()}: {entry.name}"]


@dataclasses.dataclass
class EmojiSource:
    image_size: int = 64
    eval_fraction: float = 0.2
    seed: int = 0
    background: str = "white"  # a Pillow colour name, or "none" for transparent RGBA
    emoji_test_file: str = EMOJI_TEST_FILE
    font_file: str = FONT_FILE
    captions: str = "name"  # name | templates (see caption_templates)
    _cache: dict[str, Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [8, 1024], got {self.image_size}")
        if self.captions not in CAPTION_KINDS:
            raise ValueError(f"captions must be one of {CAPTION_KINDS}, got {self.captions!r}")
        if self.background != "none":
            from PIL import ImageColor

            ImageColor.getrgb(self.background)  # raises ValueError naming a bad colour

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}  # fonts do not pickle; workers load their own
        return state

    def _entries(self) -> tuple[list[EmojiEntry], dict[str, list[EmojiEntry]]]:
        if "entries" not in self._cache:
            entries = parse_emoji_test(self.emoji_test_file)
            self._cache["entries"] = entries
            splits = split_entries(entries, self.eval_fraction, self.seed)
            family = dict(zip(entries, base_groups(entries)))
            self._cache["splits"] = splits
            self._cache["families"] = {k: len({family[e] for e in v}) for k, v in splits.items()}
        return self._cache["entries"], self._cache["splits"]

    def describe(self) -> str:
        # The cache key is a hash of this text: the default captions add nothing to it, so the
        # caches built before the setting existed stay valid.
        captions = "" if self.captions == "name" else f" captions={self.captions}"
        return (
            f"emoji: {self.emoji_test_file} rendered with {self.font_file} at "
            f"{self.image_size}px on {self.background}, eval_fraction={self.eval_fraction} "
            f"seed={self.seed}{captions}"
        )

    def splits(self) -> tuple[str, ...]:
        return ("train", "eval")

    def work_units(self, split: str) -> Sequence[int]:
        return range(len(self._entries()[1][split]))

    def num_records(self, split: str) -> int:
        return len(self._entries()[1][split])

    def default_num_shards(self, split: str) -> int:
        # Rendering is the slow part (~2 ms an emoji): small shards spread it over workers.
        return shards_for(self.num_records(split), 750)

    def info(self) -> dict[str, Any]:
        entries, splits = self._entries()
        groups, subgroups = label_names(entries)
        return {
            "group_names": groups,
            "subgroup_names": subgroups,
            "split_sizes": {k: len(v) for k, v in splits.items()},
            "split_families": self._cache["families"],
            "image_size": self.image_size,
        }

    def read(self, split: str, units: Sequence[int]) -> Iterator[Record | Skip]:
        entries, splits = self._entries()
        if "font" not in self._cache:
            self._cache["font"] = load_font(self.font_file)
        font = self._cache["font"]
        groups, subgroups = label_names(entries)
        group_ids = {g: i for i, g in enumerate(groups)}
        subgroup_ids = {s: i for i, s in enumerate(subgroups)}
        for index in units:
            entry = splits[split][index]
            code = "-".join(f"{c:04X}" for c in entry.codepoints)
            image = render(entry.emoji, font, self.image_size, self.background)
            if isinstance(image, str):
                yield Skip("unrenderable_emoji", f"{code} {entry.name}: {image}")
                continue
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            yield {
                "image": buffer.getvalue(),
                "captions": (caption_templates(entry) if self.captions == "templates"
                             else [entry.name]),
                "id": code,
                "labels": {
                    "group": group_ids[entry.group],
                    "subgroup": subgroup_ids[entry.subgroup],
                },
                "meta": {
                    "emoji": entry.emoji,
                    "group": entry.group,
                    "subgroup": entry.subgroup,
                    "version": entry.version,
                },
            }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "--source emoji (Debian fonts-noto-color-emoji + unicode-data)"
    )
    group.add_argument("--emoji-image-size", type=int, help="output side in pixels (default: 64)")
    group.add_argument(
        "--emoji-eval-fraction",
        type=float,
        help="fraction of base emoji in the eval split (default: 0.2)",
    )
    group.add_argument("--emoji-seed", type=int, help="seed of the train/eval split (default: 0)")
    group.add_argument(
        "--emoji-background",
        help="background colour, or 'none' for transparent RGBA (default: white)",
    )
    group.add_argument("--emoji-test-file", help=f"emoji-test.txt (default: {EMOJI_TEST_FILE})")
    group.add_argument("--emoji-font", help=f"font file (default: {FONT_FILE})")
    group.add_argument("--emoji-captions", choices=CAPTION_KINDS,
                       help="the CLDR name, or four phrasings of it per emoji (default: name)")


ARG_DESTS = (
    "emoji_image_size",
    "emoji_eval_fraction",
    "emoji_seed",
    "emoji_background",
    "emoji_test_file",
    "emoji_font",
    "emoji_captions",
)


def from_args(args: argparse.Namespace) -> EmojiSource:
    if args.input or args.split:
        raise ValueError("--source emoji has fixed train/eval splits; it takes no --input/--split")

    def pick(value, default):
        return default if value is None else value

    return EmojiSource(
        image_size=pick(args.emoji_image_size, 64),
        eval_fraction=pick(args.emoji_eval_fraction, 0.2),
        seed=pick(args.emoji_seed, 0),
        background=pick(args.emoji_background, "white"),
        emoji_test_file=pick(args.emoji_test_file, EMOJI_TEST_FILE),
        font_file=pick(args.emoji_font, FONT_FILE),
        captions=pick(args.emoji_captions, "name"),
    )
