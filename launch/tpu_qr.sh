#!/usr/bin/env bash
# Cloud TPU VM pod slice: request it as a queued resource, install jaxclip on every worker, and
# run the same `jaxclip train` command on all of them (jax.distributed finds the slice's
# workers through the TPU VM metadata server).
#
#   launch/tpu_qr.sh COMMAND [OPTIONS] [-- ARGS]
#
# Commands:
#   create   request the slice (queued resource QR_NAME, TPU VM TPU_NAME) and wait until it is
#            ACTIVE (WAIT=0: return once requested)
#   setup    copy this checkout to every worker (SOURCE=copy: tracked and untracked, not ignored
#            files) or clone GIT_URL at GIT_REF (SOURCE=git); install Python PYTHON_VERSION with
#            uv, then jaxclip and jax[tpu] in ~/jaxclip-venv; mount GCS_BUCKET with gcsfuse at
#            MOUNT_DIR if set. Run it again after changing code.
#   train    run `jaxclip train ARGS` on every worker, detached from the ssh session; output in
#            ~/jaxclip-train.log on each worker. FOREGROUND=1 streams it instead (the run then
#            ends with the ssh session). Options before `--`: -e NAME=VALUE (repeatable)
#            exports a variable on the workers, overriding launch/env/{common,tpu}.env.
#   logs     follow the training log of worker LOG_WORKER (default 0)
#   stop     send SIGTERM to the trainer on every worker: it checkpoints and exits
#   ssh      run `-- COMMAND` on every worker (in its home directory)
#   status   describe the queued resource and the TPU VM
#   delete   delete the queued resource and its TPU VM
#
# Environment:
#   ZONE (required), PROJECT (default: gcloud's configured project)
#   TPU_NAME=jaxclip           the TPU VM (node) name; QR_NAME=$TPU_NAME-qr
#   ACCELERATOR_TYPE=v5litepod-16
#   RUNTIME_VERSION            default chosen from ACCELERATOR_TYPE: v6e-* v2-alpha-tpuv6e,
#                              v5p-* v2-alpha-tpuv5, v5litepod-* v2-alpha-tpuv5-lite, else
#                              tpu-ubuntu2204-base (Cloud TPU's recommended images for JAX)
#   SPOT=1 | RESERVED=1        capacity type (default: on demand)
#   QR_ARGS                    extra `queued-resources create` flags, e.g. "--valid-until-duration=6h"
#   SSH_ARGS                   extra `tpu-vm ssh/scp` flags, e.g. "--internal-ip"
#   SOURCE=copy|git, GIT_URL, GIT_REF=HEAD, PYTHON_VERSION=3.12,
#   PIP_EXTRA                  more pip requirements for the workers, e.g. "jaxclip[tfds]"
#   GCS_BUCKET, MOUNT_DIR=/mnt/jaxclip   shared storage for WORKDIR (checkpoints must outlive
#                              the VMs) and for the XLA compilation cache
#   DRY_RUN=1                  print the gcloud commands instead of running them
#
# Example (a v5e-16 slice, 4 workers; WORKDIR on the bucket so a new slice can resume):
#   export ZONE=us-west4-a GCS_BUCKET=my-bucket SPOT=1
#   launch/tpu_qr.sh create && launch/tpu_qr.sh setup
#   launch/tpu_qr.sh train -- --config configs/demo.py --workdir /mnt/jaxclip/runs/demo
#   launch/tpu_qr.sh logs
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
cmd="$1"
shift
case "$cmd" in -h | --help | help) usage; exit 0 ;; esac

TPU_NAME="${TPU_NAME:-jaxclip}"
QR_NAME="${QR_NAME:-$TPU_NAME-qr}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
if [ -z "${RUNTIME_VERSION:-}" ]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
SOURCE="${SOURCE:-copy}"
GIT_REF="${GIT_REF:-HEAD}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
MOUNT_DIR="${MOUNT_DIR:-/mnt/jaxclip}"
LOG_WORKER="${LOG_WORKER:-0}"
[ -n "${ZONE:-}" ] || die "set ZONE (e.g. ZONE=us-west4-a)"

# Remote paths, expanded by the workers' shells.
# shellcheck disable=SC2016
remote_src='"$HOME/jaxclip"'
# shellcheck disable=SC2016
remote_venv='"$HOME/jaxclip-venv"'
# shellcheck disable=SC2016
remote_log='"$HOME/jaxclip-train.log"'
# shellcheck disable=SC2016
remote_pid='"$HOME/jaxclip-train.pid"'

where=("--zone=$ZONE")
[ -z "${PROJECT:-}" ] || where+=("--project=$PROJECT")
ssh_args=()
[ -z "${SSH_ARGS:-}" ] || read -r -a ssh_args <<<"$SSH_ARGS"

# Runs the shell command $2 on worker(s) $1 ("all" or an index).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" "--worker=$1" "--command=$2" \
    ${ssh_args[@]+"${ssh_args[@]}"}
}

qr_state() {
  gcloud compute tpus queued-resources describe "$QR_NAME" "${where[@]}" \
    --format='value(state.state)'
}

do_create() {
  [ $# -eq 0 ] || die "create takes no arguments (got: $(quote "$@"))"
  local args=(gcloud compute tpus queued-resources create "$QR_NAME" "${where[@]}"
    "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE"
    "--runtime-version=$RUNTIME_VERSION")
  if [ "${SPOT:-0}" = 1 ] && [ "${RESERVED:-0}" = 1 ]; then die "SPOT and RESERVED exclude each other"; fi
  [ "${SPOT:-0}" != 1 ] || args+=(--spot)
  [ "${RESERVED:-0}" != 1 ] || args+=(--reserved)
  if [ -n "${QR_ARGS:-}" ]; then
    local extra
    read -r -a extra <<<"$QR_ARGS"
    args+=("${extra[@]}")
  fi
  run "${args[@]}"
  if [ "${DRY_RUN:-0}" = 1 ] || [ "${WAIT:-1}" = 0 ]; then
    return
  fi
  local state="" last=""
  while :; do
    state="$(qr_state)"
    [ "$state" = "$last" ] || note "queued resource $QR_NAME: $state"
    last="$state"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING) die "queued resource $QR_NAME is $state (see: $0 status)" ;;
    esac
    sleep 30
  done
}

do_setup() {
  [ $# -eq 0 ] || die "setup takes no arguments (got: $(quote "$@"))"
  local fetch
  case "$SOURCE" in
    copy)
      # The working tree as git sees it: tracked plus untracked files, minus ignored ones.
      local tarball
      if [ "${DRY_RUN:-0}" = 1 ]; then
        tarball="${TMPDIR:-/tmp}/jaxclip-src.XXXXXX"
        printf '+ %s | %s\n' "$(quote git -C "$REPO_ROOT" ls-files -z -co --exclude-standard)" \
          "$(quote tar --null -T - -czf "$tarball")"
      else
        tarball="$(mktemp "${TMPDIR:-/tmp}/jaxclip-src.XXXXXX")"
        # shellcheck disable=SC2064  # (expand now: $tarball is local)
        trap "rm -f '$tarball'" EXIT
        # (COPYFILE_DISABLE: macOS tar would add ._* metadata files.)
        (cd "$REPO_ROOT" && git ls-files -z -co --exclude-standard |
          COPYFILE_DISABLE=1 tar --null -T - -czf "$tarball")
      fi
      run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxclip-src.tgz" "${where[@]}" \
        --worker=all ${ssh_args[@]+"${ssh_args[@]}"}
      fetch="mkdir -p $remote_src && tar -xzf \"\$HOME/jaxclip-src.tgz\" -C $remote_src"
      ;;
    git)
      [ -n "${GIT_URL:-}" ] || die "SOURCE=git needs GIT_URL"
      fetch="{ [ -d $remote_src/.git ] || git clone $(quote "$GIT_URL") $remote_src; }"
      fetch="$fetch && git -C $remote_src fetch --quiet origin"
      fetch="$fetch && git -C $remote_src checkout --quiet $(quote "$GIT_REF")"
      ;;
    *) die "SOURCE must be copy or git (got '$SOURCE')" ;;
  esac
  # TPU VM images ship Python 3.10; jaxclip needs >= 3.11, so uv provides the interpreter.
  local script="set -euo pipefail; $fetch"
  script="$script; export PATH=\"\$HOME/.local/bin:\$PATH\""
  script="$script; command -v uv >/dev/null || python3 -m pip install --user --quiet uv"
  script="$script || curl -LsSf https://astral.sh/uv/install.sh | sh"
  script="$script; [ -x $remote_venv/bin/python ] || uv venv --quiet --python $(quote "$PYTHON_VERSION") $remote_venv"
  script="$script; uv pip install --quiet --python $remote_venv/bin/python -e $remote_src \"jax[tpu]\""
  if [ -n "${PIP_EXTRA:-}" ]; then
    local extra
    read -r -a extra <<<"$PIP_EXTRA"
    script="$script $(quote "${extra[@]}")"
  fi
  if [ -n "${GCS_BUCKET:-}" ]; then
    # gcsfuse from Google's apt repository (cloud.google.com/storage/docs/cloud-storage-fuse/install).
    # --rename-dir-limit lets Orbax rename a finished checkpoint directory into place; on a
    # bucket with hierarchical namespace that rename is atomic.
    script="$script; if ! command -v gcsfuse >/dev/null; then"
    script="$script echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
    script="$script && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
    script="$script && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi"
    script="$script; sudo mkdir -p $(quote "$MOUNT_DIR") && sudo chown \"\$(id -u):\$(id -g)\" $(quote "$MOUNT_DIR")"
    script="$script; mountpoint -q $(quote "$MOUNT_DIR") || gcsfuse --implicit-dirs --rename-dir-limit=200000 $(quote "$GCS_BUCKET") $(quote "$MOUNT_DIR")"
  fi
  script="$script; $remote_venv/bin/python -c \"import jax, jaxclip; print(jax.__version__)\""
  script="$script | sed \"s/^/\$(hostname): ready, jax /\""
  on_workers all "bash -c $(quote "$script")"
}

do_train() {
  local exports="export JAXCLIP_DISTRIBUTED=1 JAXCLIP_VENV=$remote_venv"
  if [ -n "${GCS_BUCKET:-}" ]; then
    exports="$exports JAX_COMPILATION_CACHE_DIR=$(quote "$MOUNT_DIR/xla-cache")"
  fi
  while [ $# -gt 0 ]; do
    case "$1" in
      -e)
        case "${2:-}" in
          [A-Za-z_]*=*) ;;
          *) die "-e needs NAME=VALUE (got '${2:-}')" ;;
        esac
        local name="${2%%=*}"
        case "$name" in *[!A-Za-z0-9_]*) die "-e: bad variable name '$name'" ;; esac
        exports="$exports $name=$(quote "${2#*=}")"
        shift 2
        ;;
      --) shift; break ;;
      *) die "train: unknown option '$1' (jaxclip train's arguments go after --)" ;;
    esac
  done
  [ $# -ge 1 ] || die "train needs jaxclip train's arguments after --, e.g. -- --config C --workdir W"
  local train script
  train="launch/worker.sh tpu -- jaxclip train $(quote "$@")"
  if [ "${FOREGROUND:-0}" = 1 ]; then
    script="cd $remote_src && $exports && exec $train"
  else
    # setsid+nohup: the trainer outlives the ssh session; its pid (worker.sh execs the
    # trainer) is kept for `stop`. A second `train` while one runs is refused.
    script="cd $remote_src && $exports"
    script="$script && if [ -f $remote_pid ] && kill -0 \"\$(cat $remote_pid)\" 2>/dev/null; then"
    script="$script echo \"\$(hostname): a trainer is running (pid \$(cat $remote_pid)); stop it first\" >&2; exit 1; fi"
    script="$script; setsid nohup $train >$remote_log 2>&1 </dev/null & echo \$! >$remote_pid"
    script="$script; echo \"\$(hostname): started the trainer (pid \$!), log in ~/jaxclip-train.log\""
  fi
  on_workers all "bash -c $(quote "$script")"
}

do_stop() {
  [ $# -eq 0 ] || die "stop takes no arguments"
  local script="if [ -f $remote_pid ] && kill -TERM \"\$(cat $remote_pid)\" 2>/dev/null;"
  script="$script then echo \"\$(hostname): sent SIGTERM to \$(cat $remote_pid)\";"
  script="$script else echo \"\$(hostname): no trainer running\"; fi"
  on_workers all "bash -c $(quote "$script")"
}

case "$cmd" in
  create) do_create "$@" ;;
  setup) do_setup "$@" ;;
  train) do_train "$@" ;;
  logs)
    [ $# -eq 0 ] || die "logs takes no arguments (LOG_WORKER picks the worker)"
    on_workers "$LOG_WORKER" "tail -n 200 -F $remote_log"
    ;;
  stop) do_stop "$@" ;;
  ssh)
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || die "ssh needs a command: $0 ssh -- COMMAND"
    on_workers all "$*"
    ;;
  status)
    run gcloud compute tpus queued-resources describe "$QR_NAME" "${where[@]}"
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" \
      --format='table(name.basename(), acceleratorType, state, health, runtimeVersion)'
    ;;
  delete)
    [ $# -eq 0 ] || die "delete takes no arguments"
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${where[@]}" --force --quiet
    ;;
  *) die "unknown command '$cmd' (create, setup, train, logs, stop, ssh, status, delete; see --help)" ;;
esac
