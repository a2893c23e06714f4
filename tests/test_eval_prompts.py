"""The shipped zero-shot class lists and template sets: sizes, order, consistency, lookups."""

import ast
import importlib.util
import os

import pytest

from jaxclip.data.sources import fashion_mnist
from jaxclip.evals import prompts, zeroshot

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_named_class_lists_have_the_datasets_sizes():
    sizes = {name: len(prompts.class_names(name)) for name in prompts.class_list_names()}
    assert sizes == {
        "imagenet": 1000, "imagenet_v2": 1000, "imagenet_sketch": 1000,
        "imagenet_a": 200, "imagenet_r": 200, "imagenet_o": 200,
        "cifar10": 10, "cifar100": 100, "fashion_mnist": 10,
    }
    imagenet = prompts.class_names("imagenet")
    assert imagenet[:3] == ["tench", "goldfish", "great white shark"]
    assert imagenet[-1] == "toilet paper"
    assert prompts.class_names("cifar10")[0] == "airplane"
    assert prompts.class_names("cifar100")[1] == "aquarium fish"  # "_" read as a space


def test_imagenet_variants_are_ordered_subsets_of_imagenet():
    wnids = prompts.wnids("imagenet")
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    imagenet = prompts.class_names("imagenet")
    for variant in ("imagenet_a", "imagenet_r", "imagenet_o"):
        sub = prompts.wnids(variant)
        assert sub == sorted(sub) and set(sub) <= set(wnids)  # label order = sorted WNIDs
        names = prompts.class_names(variant)
        assert names == [imagenet[wnids.index(w)] for w in sub]
    # Spot checks against the published class lists: ImageNet-R's first class is the goldfish
    # (n01443537), ImageNet-A's is the stingray (n01498041).
    assert prompts.class_names("imagenet_r")[0] == "goldfish"
    assert prompts.class_names("imagenet_a")[0] == "stingray"
    with pytest.raises(ValueError, match="not an ImageNet class list"):
        prompts.wnids("cifar10")


def test_template_sets():
    t80, t7, t8 = (prompts.templates(n) for n in ("openai80", "openai7", "openai8"))
    assert len(t80) == len(set(t80)) == 80 and len(t7) == 7 and t8 == [*t7, "{}"]
    assert set(t7) <= set(t80)
    assert t80[0] == "a bad photo of a {}." and "itap of a {}." in t7
    assert len(prompts.templates("cifar")) == 18
    for name in prompts.template_set_names():
        # Every shipped template has a placeholder and formats cleanly.
        temps = prompts.templates(name)
        filled = zeroshot.format_prompts(["zebra"], temps)
        assert len(filled) == len(temps) and all("zebra" in p for p in filled), name


def test_fashion_mnist_prompts_are_the_datasets_captions():
    names = prompts.class_names("fashion_mnist")
    got = zeroshot.format_prompts(names, prompts.templates("fashion_mnist"))
    want = [p for c in range(10) for p in fashion_mnist.prompts(c)]
    assert got == want
    assert "a photo of an ankle boot." in got
    # With other class names the article still fits the name.
    assert zeroshot.format_prompts(["apple"], prompts.templates("fashion_mnist"))[0] == \
        "a photo of an apple."


def test_explicit_and_dataset_lists():
    assert prompts.class_names(["cat", "dog"]) == ["cat", "dog"]
    assert prompts.templates(["a {}", "the {c}"]) == ["a {}", "the {c}"]
    assert prompts.class_names("", {"class_names": ["a", "b"]}) == ["a", "b"]
    with pytest.raises(ValueError, match="info.class_names"):
        prompts.class_names("", {})
    with pytest.raises(ValueError, match="unknown class list 'imagenet1k'.*cifar10"):
        prompts.class_names("imagenet1k")
    with pytest.raises(ValueError, match="unknown template set 'openai'.*openai80"):
        prompts.templates("openai")
    with pytest.raises(ValueError, match="non-empty"):
        prompts.class_names(["cat", ""])
    with pytest.raises(ValueError, match="list of strings"):
        prompts.templates([])


def test_extraction_tool_converts_lambda_templates():
    spec = importlib.util.spec_from_file_location(
        "extract_zeroshot_metadata", os.path.join(ROOT, "tools", "extract_zeroshot_metadata.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    node = ast.parse("lambda c: f'a {c} in {{braces}}.'", mode="eval").body
    assert tool._template(node) == "a {} in {{braces}}."
    assert zeroshot.format_prompts(["cat"], [tool._template(node)]) == ["a cat in {braces}."]
