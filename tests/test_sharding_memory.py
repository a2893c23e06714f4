"""FSDP really partitions the step: the compiled train step on 8 fake devices, inspected.

A small two-tower model (width 128, depth 2, 32 px images, global batch 96) is compiled with the
trainer's own step (`train.make_train_step(...).lower(abstract state, batch specs).compile()`)
on a `data=8` mesh and on an `fsdp=8` mesh, nothing allocated. FSDP must cost no more scratch
memory and no more FLOPs per device than pure data parallelism, hold 1/8 of the parameters and
optimizer state, and never move a batch-sized activation between devices inside the layer loop.
Measured (jax 0.10.2, XLA:CPU): data=8 temp 16.4 MiB, 5.03e8 FLOPs per device; fsdp=8 13.8 MiB,
4.91e8 FLOPs, arguments 1.29 vs 9.78 MiB. Without the activation constraints
(`sharding.activation_mesh` disabled) the fsdp=8 step held the global batch's activations on
every device and all-reduced them in the layer loop: 73.2 MiB, 7.99e8 FLOPs.

The global batch, 96, is a size no weight dimension has, so a collective whose shape has a
dimension of 96 moves activations of the whole batch.
"""

import contextlib
import json
import re

import numpy as np
import pytest

from jaxclip import sharding, train
from tests.helpers import load_tool, random_batch, tiny_config

BATCH = 96


def small_config(**overrides):
    cfg = tiny_config(**overrides)
    cfg.model.embed_dim = 64
    cfg.model.image.update(image_size=32, patch_size=8, width=128, depth=2, heads=4)
    cfg.model.text.update(width=128, depth=2, heads=4)
    cfg.train.batch_size = BATCH
    return cfg


def compile_step(cfg, mesh_axes: dict, constrained: bool = True):
    """The trainer's step for `cfg` on an 8-device mesh, compiled against abstract inputs."""
    mesh = sharding.make_mesh(dict(dict(data=1, fsdp=1, tensor=1), **mesh_axes))
    m = train.build(cfg, mesh)
    # Unconstrained = the program before activation rules: the models never see the mesh.
    saved = sharding.activation_mesh
    if not constrained:
        sharding.activation_mesh = lambda x: contextlib.nullcontext()
    try:
        step = train.make_train_step(m)
        return step.lower(m.abstract_state, train.batch_specs(cfg, mesh)).compile()
    finally:
        sharding.activation_mesh = saved


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_CALLEES = re.compile(r"(?:body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-, %]+)")
_COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)"
    r"(?:-start)?\(")


def loop_collectives(hlo: str) -> list[tuple[str, str]]:
    """(op, result shape) of every collective in a while loop's body (the scanned layers, in the
    forward and the backward), following calls out of the body."""
    bodies: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            name = m.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    todo = [b for lines in bodies.values() for line in lines
            for b in re.findall(r"body=%?([\w.\-]+)", line)]
    seen: set[str] = set()
    found = []
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in bodies:
            continue
        seen.add(comp)
        for line in bodies[comp]:
            for group in _CALLEES.findall(line):
                todo.extend(c.strip().lstrip("%") for c in group.split(","))
            if m := _COLLECTIVE.search(line):
                found.append((m.group(2), m.group(1)))
    return found


def batch_sized(shape: str, batch: int) -> bool:
    return any(int(d) == batch for dims in re.findall(r"\[([\d,]*)\]", shape)
               for d in dims.split(",") if d)


@pytest.fixture(scope="module")
def compiled():
    cfg = small_config()
    return {"data": compile_step(cfg, {"data": 8}), "fsdp": compile_step(cfg, {"fsdp": 8})}


def test_fsdp_temp_memory_is_that_of_data_parallelism(compiled):
    data = compiled["data"].memory_analysis().temp_size_in_bytes
    fsdp = compiled["fsdp"].memory_analysis().temp_size_in_bytes
    assert fsdp <= 1.1 * data, (fsdp / 2**20, data / 2**20)


def test_fsdp_shards_parameters_and_optimizer_state(compiled):
    data = compiled["data"].memory_analysis().argument_size_in_bytes
    fsdp = compiled["fsdp"].memory_analysis().argument_size_in_bytes
    assert fsdp <= data / 6, (fsdp / 2**20, data / 2**20)


def test_fsdp_flops_per_device_match_data_parallelism(compiled):
    data, fsdp = flops(compiled["data"]), flops(compiled["fsdp"])
    assert abs(fsdp - data) <= 0.05 * data, (fsdp, data)


def test_no_batch_sized_collective_inside_the_layer_loop(compiled):
    hlo = compiled["fsdp"].as_text()
    inside = loop_collectives(hlo)
    # The loop does communicate: FSDP gathers each layer's weights in it.
    assert any(op == "all-gather" for op, _ in inside), inside
    bad = [(op, shape) for op, shape in inside if batch_sized(shape, BATCH)]
    assert not bad, bad


def test_gathered_weights_are_not_kept_for_the_backward(compiled):
    """The layer loops carry no stacked full-width kernel: the backward gathers each layer's
    weights again instead of holding every layer's gathered copy (`sharding.remat_block`)."""
    gathered = ["[2,128,4,32]", "[2,4,32,128]", "[2,128,512]", "[2,512,128]"]  # (depth, kernel)
    carried = [line.split(" while(")[0] for line in compiled["fsdp"].as_text().splitlines()
               if " while(" in line]
    assert carried
    kept = [shape for line in carried for shape in gathered if shape in line]
    assert not kept, kept


def test_tensor_parallel_splits_heads_and_mlp_and_keeps_the_batch_split(compiled):
    """fsdp=4 x tensor=2: memory as data=8 (measured 17.4 vs 16.4 MiB; 43.0 MiB without the
    constraints), and in the layer loop only weight gathers and the tensor-parallel all-reduces
    of the per-device batch (96 / 4 = 24 rows), never the global batch."""
    tp = compile_step(small_config(), {"fsdp": 4, "tensor": 2})
    data = compiled["data"].memory_analysis().temp_size_in_bytes
    assert tp.memory_analysis().temp_size_in_bytes <= 1.1 * data
    inside = loop_collectives(tp.as_text())
    assert any(op == "all-reduce" and batch_sized(shape, BATCH // 4) for op, shape in inside)
    assert not [(op, shape) for op, shape in inside if batch_sized(shape, BATCH)]
    # Heads (4) and MLP units (512) are split over tensor in the gathered weights.
    gathered = [shape for op, shape in inside if op == "all-gather"]
    assert any("[128,2,32]" in shape for shape in gathered), gathered
    assert any("[128,256]" in shape for shape in gathered), gathered


def test_the_checks_catch_unconstrained_activations(compiled):
    """The program before activation rules fails the memory, FLOP and HLO checks above."""
    data = compiled["data"]
    fsdp = compile_step(small_config(), {"fsdp": 8}, constrained=False)
    assert fsdp.memory_analysis().temp_size_in_bytes > 1.1 * data.memory_analysis(
    ).temp_size_in_bytes
    assert flops(fsdp) > 1.05 * flops(data)
    assert any(batch_sized(shape, BATCH) for _, shape in loop_collectives(fsdp.as_text()))


def test_planner_matches_a_real_compile_and_run(tmp_path, capsys):
    """tools/plan_memory.py plans from abstract state; the same step compiled for real arrays
    and run has the very same memory plan, and the planner's own accounting of the arguments
    (parameters + optimizer state + batch + step counter) is XLA's."""
    tool = load_tool("plan_memory")
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from tests.helpers import tiny_config\n\n\n"
                           "def get_config():\n    return tiny_config()\n")
    planned = tool.main(["--config", str(config_file), "--mesh", "data=2,fsdp=4", "--batch",
                         "32", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == planned
    assert planned["devices"] == 8 and planned["global_batch"] == 32
    assert planned["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}

    cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4, "train.batch_size": 32})
    m = train.build(cfg)
    state = train.init_state(m)
    batch = sharding.global_batch(random_batch(np.random.default_rng(0), cfg), m.mesh)
    compiled = train.make_train_step(m).lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    mem = compiled.memory_analysis()
    assert planned["temp_bytes"] == mem.temp_size_in_bytes
    assert planned["argument_bytes"] == mem.argument_size_in_bytes
    assert planned["output_bytes"] == mem.output_size_in_bytes
    own = planned["param_bytes"] + planned["opt_state_bytes"] + planned["batch_bytes"] + 4
    assert own == planned["argument_bytes"]
    assert planned["xla_flops_per_device"] > 0 and planned["flops_per_sample"] > 0
