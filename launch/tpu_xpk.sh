#!/usr/bin/env bash
# TPU training on GKE through xpk (github.com/AI-Hypercomputer/xpk): one JobSet, one pod per
# TPU VM of NUM_SLICES slices of TPU_TYPE, every pod running the same command:
#   launch/worker.sh tpu -- jaxclip train ARGS
# jax.distributed reads the slice layout GKE puts in each pod (TPU_WORKER_HOSTNAMES,
# TPU_WORKER_ID, and MEGASCALE_* for several slices).
#
#   launch/tpu_xpk.sh COMMAND [OPTIONS] [-- ARGS]
#
# Commands:
#   train    `xpk workload create` for jaxclip train ARGS. Options before `--`:
#            -e NAME=VALUE (repeatable) sets a variable in every pod, overriding
#            launch/env/{common,tpu}.env.
#   status   `xpk workload list` for this workload
#   logs     follow the logs of the workload's first pod (kubectl)
#   delete   `xpk workload delete`: the pods get SIGTERM (the trainer checkpoints) first
#
# Environment:
#   CLUSTER (required)          an xpk/GKE cluster with TPU node pools (`xpk cluster create`)
#   WORKLOAD=jaxclip-$USER      workload (JobSet) name; lowercase letters, digits and -
#   TPU_TYPE=v5litepod-16       slice type, as xpk names it; NUM_SLICES=1
#   PROJECT, ZONE               default: gcloud's configured project and zone
#   IMAGE                       a prebuilt image with jaxclip installed (launch/Dockerfile,
#                               built with --build-arg JAX_EXTRA=tpu); used as is
#   BASE_IMAGE=python:3.12-slim without IMAGE, xpk builds an image from BASE_IMAGE plus this
#                               checkout (--script-dir, needs docker locally), and each pod
#                               installs jaxclip and jax[tpu] before training
#   MAX_RESTARTS=3              JobSet restarts after a failure or preemption; each restart
#                               resumes from the newest checkpoint in WORKDIR
#   GRACE_SECONDS=120           SIGTERM-to-SIGKILL time for pods (the checkpoint must fit)
#   PRIORITY=medium             very-low | low | medium | high | very-high
#   XPK=xpk                     the xpk command (e.g. "python3 xpk/xpk.py")
#   DRY_RUN=1                   print the commands instead of running them
# WORKDIR must outlive the pods: a GCS bucket mounted in the pods (e.g. through xpk storage
# attach / the GCS FUSE CSI driver) or another shared filesystem.
#
# Example:
#   CLUSTER=my-v5e NUM_SLICES=2 launch/tpu_xpk.sh train -- \
#       --config configs/demo.py --workdir /gcs/runs/demo
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
cmd="$1"
shift
case "$cmd" in -h | --help | help) usage; exit 0 ;; esac

[ -n "${CLUSTER:-}" ] || die "set CLUSTER (the xpk cluster name)"
WORKLOAD="${WORKLOAD:-jaxclip-$(printf '%s' "${USER:-user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-')}"
TPU_TYPE="${TPU_TYPE:-v5litepod-16}"
NUM_SLICES="${NUM_SLICES:-1}"
read -r -a xpk <<<"${XPK:-xpk}"
where=()
[ -z "${PROJECT:-}" ] || where+=("--project=$PROJECT")
[ -z "${ZONE:-}" ] || where+=("--zone=$ZONE")

do_train() {
  local env_args=()
  # Several slices: jaxclip must initialise jax.distributed even when each slice is one VM.
  [ "$NUM_SLICES" = 1 ] || env_args+=(--env JAXCLIP_DISTRIBUTED=1)
  while [ $# -gt 0 ]; do
    case "$1" in
      -e)
        case "${2:-}" in [A-Za-z_]*=*) ;; *) die "-e needs NAME=VALUE (got '${2:-}')" ;; esac
        env_args+=(--env "$2")
        shift 2
        ;;
      --) shift; break ;;
      *) die "train: unknown option '$1' (jaxclip train's arguments go after --)" ;;
    esac
  done
  [ $# -ge 1 ] || die "train needs jaxclip train's arguments after --, e.g. -- --config C --workdir W"
  # xpk runs the command in a subshell and forwards SIGTERM to it; `exec` makes the trainer
  # that subshell, so the signal reaches it (worker.sh execs the trainer in turn).
  local run_cmd image_args
  run_cmd="exec launch/worker.sh tpu -- jaxclip train $(quote "$@")"
  if [ -n "${IMAGE:-}" ]; then
    image_args=("--docker-image=$IMAGE")
  else
    image_args=("--base-docker-image=${BASE_IMAGE:-python:3.12-slim}" "--script-dir=$REPO_ROOT")
    run_cmd="pip install --quiet --no-cache-dir -e . 'jax[tpu]' && $run_cmd"
  fi
  run "${xpk[@]}" workload create "--cluster=$CLUSTER" "--workload=$WORKLOAD" \
    "--tpu-type=$TPU_TYPE" "--num-slices=$NUM_SLICES" "${image_args[@]}" \
    "--max-restarts=${MAX_RESTARTS:-3}" -tgps "${GRACE_SECONDS:-120}" \
    "--priority=${PRIORITY:-medium}" ${env_args[@]+"${env_args[@]}"} ${where[@]+"${where[@]}"} \
    "--command=$run_cmd"
}

case "$cmd" in
  train) do_train "$@" ;;
  status)
    run "${xpk[@]}" workload list "--cluster=$CLUSTER" "--filter-by-job=$WORKLOAD" \
      ${where[@]+"${where[@]}"}
    ;;
  logs)
    # Pod 0 of slice 0 (JobSet and Job labels) is process 0.
    run kubectl logs -f --tail=200 -l "jobset.sigs.k8s.io/jobset-name=$WORKLOAD,jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
    ;;
  delete)
    run "${xpk[@]}" workload delete "--cluster=$CLUSTER" "--workload=$WORKLOAD" \
      ${where[@]+"${where[@]}"}
    ;;
  *) die "unknown command '$cmd' (train, status, logs, delete; see --help)" ;;
esac
