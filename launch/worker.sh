#!/usr/bin/env bash
# The command every worker runs, on every platform: sets up the environment, then execs the
# trainer (or any command), so signals (SIGTERM on preemption) reach it directly.
#
#   launch/worker.sh PLATFORM [--] COMMAND [ARG...]
#
# PLATFORM  cpu | gpu | tpu: sources launch/env/common.env, then launch/env/PLATFORM.env
#           (cpu has no file of its own). Values already in the environment win over the
#           files' defaults.
# Environment:
#   JAXCLIP_VENV   a virtual environment whose bin/ goes first on PATH (tpu_qr.sh sets it)
#   DRY_RUN=1      print the resulting environment (the env files' variables) and the command
#                  instead of running it
# Used by tpu_qr.sh (every TPU VM worker), gke_jobset.yaml and tpu_xpk.sh (every pod), and
# gpu_slurm.sbatch (every SLURM task). jax.distributed is initialised by `jaxclip train`
# itself (jaxclip/distributed.py), which reads the launch environment.
#
# Example:
#   launch/worker.sh gpu -- jaxclip train --config configs/demo.py --workdir /shared/runs/demo
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

[ $# -ge 1 ] || die "usage: worker.sh cpu|gpu|tpu [--] COMMAND [ARG...]"
platform="$1"
shift
[ "${1:-}" = "--" ] && shift
[ $# -ge 1 ] || die "no command given (usage: worker.sh $platform [--] COMMAND [ARG...])"

env_files=("$LAUNCH_DIR/env/common.env")
case "$platform" in
  cpu) ;;
  gpu | tpu) env_files+=("$LAUNCH_DIR/env/$platform.env") ;;
  *) die "unknown platform '$platform' (expected cpu, gpu or tpu)" ;;
esac
for f in "${env_files[@]}"; do
  # shellcheck source=/dev/null
  . "$f"
done

if [ -n "${JAXCLIP_VENV:-}" ]; then
  [ -x "$JAXCLIP_VENV/bin/python" ] || die "JAXCLIP_VENV=$JAXCLIP_VENV has no bin/python"
  export PATH="$JAXCLIP_VENV/bin:$PATH"
fi

# Who this is, as the launch environment says; jaxclip logs the resolved topology after
# jax.distributed.initialize.
rank="${JAXCLIP_PROCESS_ID:-${SLURM_PROCID:-${TPU_WORKER_ID:-${JOB_COMPLETION_INDEX:-}}}}"
note "host $(hostname) platform $platform${rank:+ rank $rank}: $(quote "$@")"

if [ "${DRY_RUN:-0}" = 1 ]; then
  for name in $(env_names "${env_files[@]}"); do
    printf '%s=%s\n' "$name" "${!name-}"
  done
  printf '+ %s\n' "$(quote "$@")"
  exit 0
fi
exec "$@"
