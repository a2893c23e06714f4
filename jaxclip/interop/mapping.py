"""Name-and-layout mappings between jaxclip parameter trees and foreign state dicts.

A mapping is a list of `Rule`s. Each rule ties one or more jaxclip parameters (slash paths,
"text/blocks/attn/query/kernel") to one or more foreign tensors ("text_model.encoder.layers.{i}.
self_attn.q_proj.weight") through a pair of pure array functions, `to_jax` and `to_src`, that
are exact inverses built from transposes, reshapes, slicing and concatenation only, so a round
trip is bit-identical. A rule with `depth > 0` is applied per layer: `{i}` in the foreign names
is the layer index, and the jaxclip parameters are the stacks (leading layers axis) of the
per-layer results. Fused tensors (open_clip's in_proj_weight) are rules with one foreign name
and three jaxclip paths.

`import_params` checks everything before it converts: foreign tensors that no rule consumes
(and that are not known-unused buffers), tensors a rule needs but the file lacks, and tensors
whose shape does not convert to the jaxclip parameter's shape are collected and raised together
as one `MappingError` listing them. `export_specs` / `export_tensors` run the rules the other way,
one tensor at a time, for streaming writers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

_LIST_LIMIT = 25  # entries shown per problem kind in an error message


class MappingError(ValueError):
    """Foreign tensors that are unknown, missing or mis-shaped, all listed."""


@dataclasses.dataclass(frozen=True)
class Rule:
    dst: tuple[str, ...]  # jaxclip parameter paths
    src: tuple[str, ...]  # foreign names; "{i}" is the layer index when depth > 0
    to_jax: Callable[..., tuple]  # foreign arrays (one layer) -> jaxclip arrays (one layer)
    to_src: Callable[..., tuple] | None  # the inverse; None for import-only rules
    depth: int = 0

    def names(self, i: int | None) -> list[str]:
        return [n.format(i=i) for n in self.src] if self.depth else list(self.src)

    def layers(self) -> Sequence[int | None]:
        return range(self.depth) if self.depth else (None,)


def one(fn: Callable) -> Callable[..., tuple]:
    """Wraps a single-output array function as a rule function."""
    return lambda *xs: (fn(*xs),)


def copy(dst: str, src: str, depth: int = 0) -> Rule:
    return Rule((dst,), (src,), one(lambda x: x), one(lambda x: x), depth)


def transposed(dst: str, src: str, depth: int = 0) -> Rule:
    """PyTorch Linear weight (out, in) <-> jaxclip kernel (in, out)."""
    return Rule((dst,), (src,), one(lambda w: w.T), one(lambda k: k.T), depth)


def layer_norm(dst: str, src: str, depth: int = 0) -> list[Rule]:
    """PyTorch LayerNorm weight/bias <-> jaxclip scale/bias."""
    return [copy(f"{dst}/scale", f"{src}.weight", depth), copy(f"{dst}/bias", f"{src}.bias", depth)]


def attention_rules(dst: str, src_qkv: tuple[str, str, str] | str, src_out: str, *, width: int,
                    heads: int, depth: int) -> list[Rule]:
    """Attention projections: separate q/k/v Linears (HF) or one fused in_proj (open_clip).

    jaxclip keeps per-head kernels (w, heads, head_dim); PyTorch's output index is
    head * head_dim + j, so the per-head kernel is a plain reshape of the transposed weight.
    """
    hd = width // heads
    names = ("query", "key", "value")

    def w_in(w):
        return w.T.reshape(width, heads, hd)

    def w_out(k):
        return k.reshape(width, width).T

    rules = []
    if isinstance(src_qkv, str):  # fused: weight (3w, w), bias (3w,), in q, k, v order
        rules.append(Rule(
            tuple(f"{dst}/{n}/kernel" for n in names), (f"{src_qkv}_weight",),
            lambda w: tuple(w_in(w[j * width:(j + 1) * width]) for j in range(3)),
            lambda q, k, v: (np.concatenate([w_out(q), w_out(k), w_out(v)]),), depth))
        rules.append(Rule(
            tuple(f"{dst}/{n}/bias" for n in names), (f"{src_qkv}_bias",),
            lambda b: tuple(b[j * width:(j + 1) * width].reshape(heads, hd) for j in range(3)),
            lambda q, k, v: (np.concatenate([q.reshape(width), k.reshape(width),
                                             v.reshape(width)]),), depth))
    else:
        for n, s in zip(names, src_qkv, strict=True):
            rules.append(Rule((f"{dst}/{n}/kernel",), (f"{s}.weight",), one(w_in), one(w_out),
                              depth))
            rules.append(Rule((f"{dst}/{n}/bias",), (f"{s}.bias",),
                              one(lambda b: b.reshape(heads, hd)),
                              one(lambda b: b.reshape(width)), depth))
    rules.append(Rule((f"{dst}/out/kernel",), (f"{src_out}.weight",),
                      one(lambda w: w.T.reshape(heads, hd, width)),
                      one(lambda k: k.reshape(width, width).T), depth))
    rules.append(copy(f"{dst}/out/bias", f"{src_out}.bias", depth))
    return rules


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def _zeros(shape) -> np.ndarray:
    # A zero-stride view: the inverse functions can run on it to compute foreign shapes without
    # allocating the parameter.
    return np.broadcast_to(np.zeros((), np.float32), shape)


def foreign_shapes(rule: Rule, dst_shapes: Mapping[str, tuple]) -> list[tuple[int, ...]]:
    """Shapes of one layer's foreign tensors, given the jaxclip parameters' (stacked) shapes."""
    per_layer = [tuple(dst_shapes[p][1:] if rule.depth else dst_shapes[p]) for p in rule.dst]
    return [_shape(y) for y in rule.to_src(*[_zeros(s) for s in per_layer])]


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_LIST_LIMIT]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def raise_problems(what: str, problems: dict[str, list[str]]) -> None:
    parts = [_listing(title, items) for title, items in problems.items() if items]
    if parts:
        raise MappingError(f"{what}:\n" + "\n".join(parts))


def import_params(rules: Sequence[Rule], tensors: Mapping[str, np.ndarray],
                  dst_shapes: Mapping[str, tuple], *, ignore: str | None = None,
                  what: str = "checkpoint") -> dict[str, np.ndarray]:
    """Foreign tensors -> flat {jaxclip path: float32 array}; every problem listed in one error.

    `dst_shapes` are the jaxclip model's parameter shapes (the model built from the config the
    importer derived), `ignore` a regex of foreign names known to carry no parameters.
    """
    missing, misshaped, used = [], [], set()
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        stacks: list[list[np.ndarray]] = [[] for _ in rule.dst]
        complete = True
        for i in rule.layers():
            names = rule.names(i)
            absent = [n for n in names if n not in tensors]
            used.update(n for n in names if n in tensors)
            if absent:
                missing += absent
                complete = False
                continue
            arrays = [tensors[n] for n in names]
            want = [tuple(dst_shapes[p][1:] if rule.depth else dst_shapes[p]) for p in rule.dst]
            try:
                results = rule.to_jax(*arrays)
                ok = [_shape(r) for r in results] == want
            except ValueError:  # a reshape that cannot work
                ok = False
            if not ok:
                got = ", ".join(f"{n} {_shape(a)}" for n, a in zip(names, arrays, strict=True))
                if rule.to_src is not None:
                    exp = foreign_shapes(rule, dst_shapes)
                    expected = ", ".join(f"{n} {s}" for n, s in zip(names, exp, strict=True))
                else:
                    expected = ", ".join(f"{p} {s}" for p, s in zip(rule.dst, want, strict=True))
                misshaped.append(f"{got}; expected {expected}")
                complete = False
                continue
            for stack, r in zip(stacks, results, strict=True):
                stack.append(np.asarray(r, dtype=np.float32))
        if complete:
            for path, stack in zip(rule.dst, stacks, strict=True):
                out[path] = np.stack(stack) if rule.depth else stack[0]
    pattern = re.compile(ignore) if ignore else None
    unknown = sorted(n for n in tensors if n not in used and not (pattern and pattern.search(n)))
    raise_problems(f"cannot import {what}", {
        "unknown tensors (no jaxclip parameter maps to them)": unknown,
        "missing tensors": missing,
        "mis-shaped tensors": misshaped,
    })
    uncovered = sorted(set(dst_shapes) - set(out))
    if uncovered:  # a bug in a mapping, not in the checkpoint
        raise MappingError(f"the {what} mapping leaves jaxclip parameters unset: {uncovered}")
    return out


def export_specs(rules: Sequence[Rule], dst_shapes: Mapping[str, tuple]
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """(foreign name, shape) of every exported tensor, in the order `export_tensors` yields."""
    uncovered = sorted(set(dst_shapes) - {p for r in rules for p in r.dst})
    if uncovered:
        raise MappingError(f"no foreign tensor represents these jaxclip parameters: {uncovered}")
    specs = []
    for rule in rules:
        shapes = foreign_shapes(rule, dst_shapes)
        for i in rule.layers():
            specs += list(zip(rule.names(i), shapes, strict=True))
    return specs


def export_tensors(rules: Sequence[Rule], get: Callable[[str, int | None], np.ndarray]
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (foreign name, array) one at a time; `get(path, i)` fetches layer i of a stacked
    jaxclip parameter (or the whole parameter when i is None)."""
    for rule in rules:
        for i in rule.layers():
            results = rule.to_src(*[get(p, i) for p in rule.dst])
            for name, array in zip(rule.names(i), results, strict=True):
                yield name, np.asarray(array, order="C")
