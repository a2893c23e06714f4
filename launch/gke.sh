#!/usr/bin/env bash
# GKE TPU training with a plain JobSet (launch/gke_jobset.yaml), for clusters used without xpk.
#
#   launch/gke.sh COMMAND [OPTIONS] [-- ARGS]
#
# Commands:
#   render   print the JobSet for `jaxclip train ARGS` (options before `--`: -e NAME=VALUE,
#            repeatable, sets a variable in every pod, overriding launch/env/{common,tpu}.env)
#   apply    render and `kubectl apply` it (same options)
#   status   the JobSet and its pods
#   logs     follow the logs of pod 0 of slice 0 (process 0)
#   delete   delete the JobSet: pods get SIGTERM and GRACE_SECONDS to checkpoint
#
# Environment (the template's fields):
#   IMAGE (required)         image built with launch/Dockerfile (JAX_EXTRA=tpu)
#   GCS_BUCKET (required)    bucket mounted at /gcs in every pod (GCS FUSE CSI driver); put the
#                            workdir under /gcs. The XLA compilation cache goes to /gcs/xla-cache.
#   NAME=jaxclip-$USER       JobSet name
#   TPU_ACCELERATOR=tpu-v5-lite-podslice, TPU_TOPOLOGY=4x4, VMS_PER_SLICE=4, CHIPS_PER_VM=4
#                            the node pool's GKE TPU labels and shape (defaults: v5e-16). Others:
#                            v6e-16  tpu-v6e-slice 4x4 4 4;   v5p-32 tpu-v5p-slice 2x2x4 4 4;
#                            v4-32   tpu-v4-podslice 2x2x4 4 4;  single host v5e-8: 2x4 1 8
#   NUM_SLICES=1             slices (multi-slice over DCN)
#   MAX_RESTARTS=3           JobSet restarts after failures or preemptions (each resumes)
#   GRACE_SECONDS=120        SIGTERM-to-SIGKILL time for a pod
#   SERVICE_ACCOUNT=default  Kubernetes service account allowed to use GCS_BUCKET
#   KUBECTL=kubectl, DRY_RUN=1 (print the kubectl commands instead of running them)
#
# Example:
#   export IMAGE=us-docker.pkg.dev/my-project/jaxclip/jaxclip:tpu GCS_BUCKET=my-bucket
#   launch/gke.sh apply -- --config configs/demo.py --workdir /gcs/runs/demo
#   launch/gke.sh logs
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
cmd="$1"
shift
case "$cmd" in -h | --help | help) usage; exit 0 ;; esac

NAME="${NAME:-jaxclip-$(printf '%s' "${USER:-user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-')}"
read -r -a kubectl <<<"${KUBECTL:-kubectl}"

json_str() {  # a JSON string, which is also a YAML double-quoted scalar
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\t'/\\t}"
  s="${s//$'\n'/\\n}"
  printf '"%s"' "$s"
}

render() {
  [ -n "${IMAGE:-}" ] || die "set IMAGE (an image built with launch/Dockerfile)"
  [ -n "${GCS_BUCKET:-}" ] || die "set GCS_BUCKET (checkpoints must outlive the pods)"
  local env_json="" entry
  add_env() {
    entry="{\"name\": $(json_str "$1"), \"value\": $(json_str "$2")}"
    env_json="${env_json:+$env_json, }$entry"
  }
  add_env JAX_COMPILATION_CACHE_DIR /gcs/xla-cache
  # Several slices: jaxclip must initialise jax.distributed even when each slice is one VM.
  [ "${NUM_SLICES:-1}" = 1 ] || add_env JAXCLIP_DISTRIBUTED 1
  while [ $# -gt 0 ]; do
    case "$1" in
      -e)
        case "${2:-}" in [A-Za-z_]*=*) ;; *) die "-e needs NAME=VALUE (got '${2:-}')" ;; esac
        add_env "${2%%=*}" "${2#*=}"
        shift 2
        ;;
      --) shift; break ;;
      *) die "$cmd: unknown option '$1' (jaxclip train's arguments go after --)" ;;
    esac
  done
  [ $# -ge 1 ] || die "$cmd needs jaxclip train's arguments after --, e.g. -- --config C --workdir /gcs/runs/R"
  local args_json="" arg
  for arg in "$@"; do args_json="${args_json:+$args_json, }$(json_str "$arg")"; done

  # perl substitutes literally (no shell pattern or sed replacement syntax in the values).
  JC_NAME="$NAME" JC_IMAGE="$IMAGE" JC_GCS_BUCKET="$GCS_BUCKET" \
    JC_TPU_ACCELERATOR="${TPU_ACCELERATOR:-tpu-v5-lite-podslice}" \
    JC_TPU_TOPOLOGY="${TPU_TOPOLOGY:-4x4}" JC_VMS_PER_SLICE="${VMS_PER_SLICE:-4}" \
    JC_CHIPS_PER_VM="${CHIPS_PER_VM:-4}" JC_NUM_SLICES="${NUM_SLICES:-1}" \
    JC_MAX_RESTARTS="${MAX_RESTARTS:-3}" JC_GRACE_SECONDS="${GRACE_SECONDS:-120}" \
    JC_SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-default}" \
    JC_TRAIN_ARGS="[$args_json]" JC_ENV="[$env_json]" \
    perl -pe 's/\$\{([A-Z_]+)\}/exists $ENV{"JC_$1"} ? $ENV{"JC_$1"} : die "unknown field \${$1}\n"/ge' \
    "$LAUNCH_DIR/gke_jobset.yaml"
}

pod0="jobset.sigs.k8s.io/jobset-name=$NAME,jobset.sigs.k8s.io/job-index=0"
pod0="$pod0,batch.kubernetes.io/job-completion-index=0"
case "$cmd" in
  render) render "$@" ;;
  apply)
    manifest="$(render "$@")"
    if [ "${DRY_RUN:-0}" = 1 ]; then
      printf '%s\n' "$manifest"
      printf '+ %s\n' "$(quote "${kubectl[@]}" apply -f -)"
    else
      printf '%s\n' "$manifest" | "${kubectl[@]}" apply -f -
    fi
    ;;
  status)
    run "${kubectl[@]}" get jobset "$NAME"
    run "${kubectl[@]}" get pods -o wide -l "jobset.sigs.k8s.io/jobset-name=$NAME"
    ;;
  logs) run "${kubectl[@]}" logs -f --tail=200 -l "$pod0" ;;
  delete) run "${kubectl[@]}" delete jobset "$NAME" ;;
  *) die "unknown command '$cmd' (render, apply, status, logs, delete; see --help)" ;;
esac
