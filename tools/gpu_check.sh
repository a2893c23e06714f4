#!/usr/bin/env bash
# The accelerator check of jaxclip, in one run of under 8 minutes on one H100 or H200:
#   1. the model and loss tests on the GPU (tests that need 8 devices skip, saying so);
#   2. ViT-B/16 CLIP in bfloat16: the largest global batch whose planned step fits in 90% of the
#      GPU's memory (tools/plan_memory.py --fit), and the cuDNN attention kernels of both towers
#      in that step's optimised HLO (model.attn_impl "auto" must resolve to cuDNN here);
#   3. tools/bench_train.py at that batch: samples/s, step time, MFU against the datasheet dense
#      bf16 peak (jaxclip/flops.py);
#   4. tools/bench_loss.py: CLIP and SigLIP, ring (tiled) against all_gather, loss + gradients at
#      global batch 32,768, d 512: memory and time.
#
#     tools/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to $OUT, else runs/gpu_check
#     tools/gpu_check.sh --wheels             # on a machine with PyPI: fetch .whl/ (see below)
#
# Every step writes its JSON into OUT_DIR and the script ends with summary.json there; a step
# that fails is recorded and the rest still run (exit 1 if any failed). The machine needs jax
# with CUDA, flax, optax and orbax; packages it lacks (grain, array_record, ml_collections, ...)
# can come as wheels in .whl/ (they are installed into /tmp/site first): `--wheels` downloads
# the ones a CUDA image with jax, flax, optax, orbax, opencv, tokenizers and PyYAML lacks, for
# Python 3.12 on x86-64. The sizes can be made
# small to try the script on a CPU (tests/test_gpu_check.py does):
#   MODEL=ViT-B-16 BATCHES=1024,768,512,384,256 LOSS_BATCH=32768 LOSS_TILE=1024 STEPS=20
#   TESTS="tests/test_models.py tests/test_losses.py tests/test_losses_ring.py" PLATFORM=cuda
#   MEMORY_GIB= (the fit's device memory where the backend reports none) EXTRA= (overrides)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [ "${1:-}" = --wheels ]; then
  mkdir -p .whl
  for pkg in grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 ftfy==6.3.1 wcwidth \
      tensorboardX==2.6.5 portpicker; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$pkg" || exit 1
  done
  ls .whl
  exit 0
fi
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
MODEL=${MODEL:-ViT-B-16}
BATCHES=${BATCHES:-1024,768,512,384,256}
LOSS_BATCH=${LOSS_BATCH:-32768}
LOSS_TILE=${LOSS_TILE:-1024}
LOSS_DIM=${LOSS_DIM:-512}
STEPS=${STEPS:-20}
TESTS=${TESTS:-tests/test_models.py tests/test_losses.py tests/test_losses_ring.py}
PLATFORM=${PLATFORM:-cuda}
MEMORY_GIB=${MEMORY_GIB:-}  # device memory for the fit where the backend reports none (CPU)
EXTRA=${EXTRA:-}  # more config overrides for steps 2 and 3, e.g. --config.model.remat=full
PY=${PYTHON:-python3}
export JAX_PLATFORMS=$PLATFORM PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 4 "$out/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || failed+=("$name")
  return "$rc"
}

if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c 'import grain, ml_collections' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u +%FT%TZ; command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

# 1. Tests on the accelerator. Tests that need more devices than there are skip here (conftest,
#    JAXCLIP_TEST_ACCELERATOR=1); the multi-device forms run in CI on fake CPU devices.
# shellcheck disable=SC2086  # TESTS is a list of paths
step tests 240 env JAXCLIP_TEST_ACCELERATOR=1 JAXCLIP_CACHE=/tmp/jaxclip-gpu-check \
  "$PY" -m pytest -q -p no:warnings -p no:cacheprovider $TESTS

# 2. The largest batch that fits, and the attention kernels in its step.
# shellcheck disable=SC2086
step fit 180 "$PY" tools/plan_memory.py --model "$MODEL" --config.model.dtype=bfloat16 \
  --config.model.attn_impl=auto $EXTRA --fit --batch "$BATCHES" --hlo "$out/step.hlo" --json \
  ${MEMORY_GIB:+--memory-gib "$MEMORY_GIB"}
tail -n 1 "$out/fit.log" >"$out/fit.json"
batch=$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["global_batch"] if r["fits"] else "")' "$out/fit.json" 2>/dev/null)
rm -f "$out/step.hlo"  # large; its findings are in fit.json

# 3. Throughput at that batch.
if [ -n "$batch" ]; then
  # shellcheck disable=SC2086
  step bench_train 180 "$PY" tools/bench_train.py --model "$MODEL" --config.model.dtype=bfloat16 \
    --config.model.attn_impl=auto --config.train.batch_size="$batch" $EXTRA --steps "$STEPS" \
    --json "$out/bench_train.json"
else
  echo "== bench_train skipped: no batch fits (see fit.log)"
  failed+=(bench_train)
fi

# 4. Loss memory and time, ring against all_gather, one device (the ring is then its tiled
#    single-block form: the memory of the b x B logits against O(b x tile)).
for loss in clip siglip; do
  for impl in all_gather ring; do
    tile=0
    [ "$impl" = ring ] && tile=$LOSS_TILE
    step "loss_${loss}_$impl" 90 "$PY" tools/bench_loss.py --loss "$loss" --impl "$impl" \
      --batch "$LOSS_BATCH" --dim "$LOSS_DIM" --devices 1 --tile "$tile" --json
    tail -n 1 "$out/loss_${loss}_$impl.log" >"$out/loss_${loss}_$impl.json"
  done
done

"$PY" - "$out" "${failed[@]}" <<'EOF'
import json, os, sys

out, failed = sys.argv[1], sys.argv[2:]


def read(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


fit = read("fit.json") or {}
calls = fit.get("cudnn_attention_calls", [])
summary = {
    "machine": open(os.path.join(out, "machine.txt")).read().strip().splitlines(),
    "failed_steps": failed,
    "fit": {k: fit.get(k) for k in ("global_batch", "fits", "peak_bytes", "memory_limit_bytes",
                                    "tried", "attn_impl", "compile_seconds")},
    # Both towers: the kernels' sequence lengths (dimension 1 of the query) must include the
    # image's tokens and the text's context.
    "cudnn_attention": {"kernels": len(calls),
                        "sequence_lengths": sorted({c["shape"][1] for c in calls
                                                    if len(c["shape"]) == 4})},
    "bench_train": read("bench_train.json"),
    "loss": {f"{loss}_{impl}": read(f"loss_{loss}_{impl}.json")
             for loss in ("clip", "siglip") for impl in ("all_gather", "ring")},
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
EOF
[ ${#failed[@]} = 0 ]
