# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run.
#
#   source "$(dirname "$0")/lib.sh"
#
# Provides:
#   die MSG            print "SCRIPT: error: MSG" on stderr, exit 2
#   note MSG           print "[SCRIPT] MSG" on stderr
#   quote ARG...       print the arguments as one shell-quoted line (readable, and exact:
#                      pasting the line into bash runs the same argv)
#   run CMD...         run CMD; with DRY_RUN=1 print "+ CMD" (quoted) on stdout instead
#   env_names FILE...  the names the env files export, one per line
# and sets LAUNCH_DIR (this folder) and REPO_ROOT (its parent).
# Written for bash >= 3.2 (macOS' /bin/bash): no associative arrays, mapfile or ${x@Q}.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # (used by the scripts that source this file)
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
_LAUNCH_SCRIPT="$(basename "$0")"

die() {
  printf '%s: error: %s\n' "$_LAUNCH_SCRIPT" "$*" >&2
  exit 2
}

note() {
  printf '[%s] %s\n' "$_LAUNCH_SCRIPT" "$*" >&2
}

quote() {
  local out="" arg
  for arg in "$@"; do
    case "$arg" in
      "" | *[!A-Za-z0-9_./:=,@%+-]*)
        # Single quotes protect everything but a single quote, written as '\''.
        arg="'${arg//\'/\'\\\'\'}'"
        ;;
    esac
    out="${out:+$out }$arg"
  done
  printf '%s\n' "$out"
}

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

env_names() {
  sed -n 's/^[[:space:]]*export[[:space:]]\{1,\}\([A-Za-z_][A-Za-z0-9_]*\).*/\1/p' "$@" | awk '!seen[$0]++'
}
