#!/usr/bin/env bash
# Local multi-process launcher: runs NPROC copies of a command on this machine as one
# multi-process JAX job (a localhost coordinator), the way a pod or cluster would run them.
# Used by the tests, and to try multi-host code on a laptop.
#
#   launch/local.sh -n NPROC [options] -- COMMAND [ARG...]
#
# Options:
#   -n, --nproc N                   number of processes (required)
#   --cpu-devices-per-process K     run on CPU with K fake devices per process:
#                                   JAX_PLATFORMS=cpu and XLA_FLAGS gets
#                                   --xla_force_host_platform_device_count=K (replacing any
#                                   count already there); multi-process CPU runs use gloo
#   --gpus-per-process G            one machine, several GPUs per process: process r drives
#                                   GPUs r*G .. r*G+G-1 (JAXCLIP_LOCAL_DEVICE_IDS)
#   --port P                        coordinator port (default: a free port in 20000-32767)
#   --host H                        coordinator host (default: localhost)
#   --log-dir DIR                   also write each process's output to DIR/rank<r>.log
#   --term-timeout S                seconds a process gets to exit after SIGTERM before it is
#                                   killed (default 30; a trainer checkpoints in that time)
#   --env-file FILE                 source FILE before starting (repeatable), e.g.
#                                   launch/env/common.env
# Each process gets JAXCLIP_COORDINATOR=HOST:PORT, JAXCLIP_NUM_PROCESSES=N and
# JAXCLIP_PROCESS_ID=r; `jaxclip train` (jaxclip/distributed.py) initialises jax.distributed
# from them. Output lines are prefixed with "[r] ".
#
# Signals and failures: SIGTERM, SIGINT and SIGHUP are forwarded to every process (a second
# SIGINT kills them at once). When a process exits non-zero (or is killed, SIGKILL included), the
# others get SIGTERM, so a crashed rank never leaves its peers waiting in a collective. A process
# still alive --term-timeout seconds after SIGTERM is killed with its process group. The exit
# status is the first non-zero status of a process in the order they ended (128+N for signal N),
# else 0.
# No orphans: if this launcher itself dies without cleaning up (SIGKILL, a test's timeout, the OOM
# killer), its processes die with it. Each is started with the kernel's parent-death signal
# (PR_SET_PDEATHSIG=SIGKILL, through util-linux's setpriv; Linux), and a watcher process of its
# own kills every process group the launcher started as soon as the launcher is gone (any OS).
#
# Examples:
#   launch/local.sh -n 2 --cpu-devices-per-process 4 -- \
#       jaxclip train --config configs/demo.py --workdir runs/demo-2proc
#   launch/local.sh -n 4 --gpus-per-process 2 -- jaxclip train --config ... --workdir ...
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
}

nproc="" cpu_devices="" gpus_per_process="" port="" host="localhost" log_dir=""
term_timeout=30
while [ $# -gt 0 ]; do
  case "$1" in
    -n | --nproc) nproc="${2:?$1 needs a value}"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --cpu-devices-per-process) cpu_devices="${2:?$1 needs a value}"; shift 2 ;;
    --cpu-devices-per-process=*) cpu_devices="${1#*=}"; shift ;;
    --gpus-per-process) gpus_per_process="${2:?$1 needs a value}"; shift 2 ;;
    --gpus-per-process=*) gpus_per_process="${1#*=}"; shift ;;
    --port) port="${2:?$1 needs a value}"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --host) host="${2:?$1 needs a value}"; shift 2 ;;
    --host=*) host="${1#*=}"; shift ;;
    --log-dir) log_dir="${2:?$1 needs a value}"; shift 2 ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --term-timeout) term_timeout="${2:?$1 needs a value}"; shift 2 ;;
    --term-timeout=*) term_timeout="${1#*=}"; shift ;;
    --env-file)
      [ -f "${2:-}" ] || die "--env-file: no such file '${2:-}'"
      # shellcheck source=/dev/null
      . "$2"
      shift 2
      ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command goes after --; see --help)" ;;
  esac
done
[ $# -ge 1 ] || die "no command given (usage: local.sh -n NPROC [options] -- COMMAND ...)"
is_uint() { case "$1" in "" | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }
if ! is_uint "$nproc" || [ "$nproc" -lt 1 ]; then
  die "-n NPROC must be a positive integer (got '$nproc')"
fi
if [ -n "$cpu_devices" ] && { ! is_uint "$cpu_devices" || [ "$cpu_devices" -lt 1 ]; }; then
  die "--cpu-devices-per-process must be a positive integer (got '$cpu_devices')"
fi
if [ -n "$gpus_per_process" ] && { ! is_uint "$gpus_per_process" || [ "$gpus_per_process" -lt 1 ]; }; then
  die "--gpus-per-process must be a positive integer (got '$gpus_per_process')"
fi
[ -z "$cpu_devices" ] || [ -z "$gpus_per_process" ] ||
  die "--cpu-devices-per-process and --gpus-per-process exclude each other"
is_uint "$term_timeout" || die "--term-timeout must be a whole number of seconds"

# A port nobody listens on, below Linux' ephemeral range (32768+) so that outgoing connections
# do not take it meanwhile. Bash's /dev/tcp connects: a refused connection means a free port.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ -z "$port" ]; then
  for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    candidate=$((20000 + RANDOM % 12768))
    if port_free "$candidate"; then port="$candidate"; break; fi
  done
  [ -n "$port" ] || die "found no free port; pass --port"
else
  is_uint "$port" || die "--port must be a number (got '$port')"
fi

export JAXCLIP_COORDINATOR="$host:$port" JAXCLIP_NUM_PROCESSES="$nproc"
if [ -n "$cpu_devices" ]; then
  export JAX_PLATFORMS=cpu
  flags=""
  read -r -a inherited <<<"${XLA_FLAGS:-}"
  for flag in ${inherited[@]+"${inherited[@]}"}; do
    case "$flag" in --xla_force_host_platform_device_count=*) ;; *) flags="$flags $flag" ;; esac
  done
  export XLA_FLAGS="${flags# }${flags:+ }--xla_force_host_platform_device_count=$cpu_devices"
fi
[ -z "$log_dir" ] || mkdir -p "$log_dir"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/jaxclip-local.XXXXXX")"
pids=() readers=() states=()   # states[r]: running | exited
status=0 stopping=0 deadline=0 interrupts=0

# The monitoring loop below runs with stderr sent to /dev/null, to drop bash's own job reports
# ("line 123: 4567 Killed ..."); the launcher's messages go to the original stderr, fd 3.
exec 3>&2
say() { note "$@" 2>&3; }

watcher=""
# shellcheck disable=SC2317  # (called from traps)
cleanup() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  if [ -n "$watcher" ]; then  # a clean exit: the watcher has nothing left to do
    tell_watcher "done"
    exec 4>&-
    wait "$watcher" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# Sends SIG to every process still running and starts the kill deadline (once).
stop_all() {
  local sig="$1" r
  for r in "${!pids[@]}"; do
    if [ "${states[$r]}" = running ]; then kill "-$sig" "${pids[$r]}" 2>/dev/null || true; fi
  done
  if [ "$stopping" = 0 ]; then
    stopping=1
    deadline=$(($(date +%s) + term_timeout))
  fi
}
# shellcheck disable=SC2317  # (called from traps)
on_signal() {
  local sig="$1"
  if [ "$sig" = INT ]; then
    interrupts=$((interrupts + 1))
    if [ "$interrupts" -ge 2 ]; then
      say "second interrupt: killing all processes"
      deadline=0
      stopping=1
      return
    fi
  fi
  say "got SIG$sig: forwarding it to all $nproc processes"
  stop_all "$sig"
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# The prefixer. mawk (Debian's awk) reads a pipe in large blocks unless told -W interactive, so
# lines would only show up when a process exits; gawk and BSD awk pass lines on as they come.
awk_cmd=(awk)
# (No `| grep -q` here: grep exiting early would SIGPIPE awk and, under pipefail, fail the test.)
case "$(awk -W version 2>&1 || true)" in *mawk*) awk_cmd+=(-W interactive) ;; esac
# The readers share one stdout: each line goes out as one string, hence one write(2) (atomic on
# a pipe up to PIPE_BUF bytes); mawk's `print` writes the line and its newline separately, so
# two ranks' lines could interleave mid-line.

# Parent-death signal (Linux, util-linux >= 2.33): `setpriv --pdeathsig KILL` sets
# PR_SET_PDEATHSIG before it execs the command, so the kernel sends the process SIGKILL when this
# launcher dies, however it dies: nothing has to survive to do it, which is why it is used even
# though the watcher below covers the same ground. It reaches the process itself, not what the
# process started (the watcher kills whole process groups), and it does not exist outside Linux.
pdeathsig=()
case "$(setpriv --help 2>&1 || true)" in *--pdeathsig*) pdeathsig=(setpriv --pdeathsig KILL --) ;; esac

# The watcher: a subshell in a process group of its own (a kill aimed at this launcher's group
# misses it) that ignores INT, TERM and HUP and reads a pipe only this launcher writes to: the
# process group of each process it starts, then "done" on a clean exit (the EXIT trap). When the
# pipe reports end-of-file without "done", the launcher is gone (SIGKILL, a crash), and the
# watcher kills every process group it was told about, the processes' own children included. No
# polling: end-of-file arrives the moment the launcher's end of the pipe closes, which is why the
# processes and the output readers are started without it (4>&-, as their first redirection: a
# child stuck in a later one would otherwise hold the pipe open).
mkfifo "$tmp/watch"
set -m
(
  trap '' INT TERM HUP
  groups=() clean=0
  while read -r line; do
    case "$line" in done) clean=1 ;; *) groups+=("$line") ;; esac
  done
  if [ "$clean" = 0 ] && [ "${#groups[@]}" -gt 0 ]; then
    note "the launcher is gone: killing its ${#groups[@]} processes"
    for group in "${groups[@]}"; do kill -KILL -- "-$group" 2>/dev/null || true; done
  fi
) <"$tmp/watch" >/dev/null 2>&3 &
watcher=$!
set +m
exec 4>"$tmp/watch"
# A subshell writes, so that a watcher killed by hand (a closed pipe: SIGPIPE) cannot take this
# launcher down with it.
tell_watcher() { (printf '%s\n' "$1" >&4) 2>/dev/null || true; }

# Job control: every process leads its own process group, so a terminal's Ctrl-C reaches only
# this launcher (which forwards it once) and a process tree can be killed as a whole.
set -m
for ((r = 0; r < nproc; r++)); do
  [ "$stopping" = 0 ] || break  # a signal arrived while starting: start no more
  fifo="$tmp/out$r"
  mkfifo "$fifo"
  log="${log_dir:+$log_dir/rank$r.log}"
  # shellcheck disable=SC2016  # (an awk program)
  "${awk_cmd[@]}" -v prefix="[$r] " -v logfile="$log" \
    '{ printf "%s", prefix $0 "\n"; fflush(); if (logfile != "") { print > logfile; fflush(logfile) } }' \
    4>&- <"$fifo" &
  readers[r]=$!
  local_ids=""
  if [ -n "$gpus_per_process" ]; then
    for ((g = r * gpus_per_process; g < (r + 1) * gpus_per_process; g++)); do
      local_ids="${local_ids:+$local_ids,}$g"
    done
  fi
  # This launcher opens the pipe's write end itself (which pairs with the reader's open at once)
  # and hands it over. Were the process to open it, one stopped by SIGTERM before it got that far
  # (a peer that failed at once) would leave its reader blocked in open() forever, and this
  # launcher waiting for that reader: seen once in 162 runs of a rank that exits at once.
  exec 5>"$fifo"
  JAXCLIP_PROCESS_ID="$r" JAXCLIP_LOCAL_DEVICE_IDS="${local_ids:-${JAXCLIP_LOCAL_DEVICE_IDS:-}}" \
    ${pdeathsig[@]+"${pdeathsig[@]}"} "$@" 4>&- </dev/null >&5 2>&1 5>&- &
  pids[r]=$!
  exec 5>&-
  states[r]=running
  tell_watcher "${pids[r]}"
done
set +m
running="${#pids[@]}"
say "started $running processes (coordinator $JAXCLIP_COORDINATOR): $(quote "$@")"

while [ "$running" -gt 0 ]; do
  for r in "${!pids[@]}"; do
    [ "${states[$r]}" = running ] || continue
    kill -0 "${pids[$r]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$r]}" || rc=$?
    states[r]=exited
    running=$((running - 1))
    if [ "$rc" != 0 ]; then
      say "process $r exited with status $rc"
      [ "$status" != 0 ] || status="$rc"
      if [ "$stopping" = 0 ] && [ "$running" -gt 0 ]; then
        say "stopping the other processes"
        stop_all TERM
      fi
    fi
  done
  [ "$running" -gt 0 ] || break
  if [ "$stopping" = 1 ] && [ "$(date +%s)" -ge "$deadline" ]; then
    for r in "${!pids[@]}"; do
      if [ "${states[$r]}" = running ]; then
        say "process $r is still running: killing it"
        kill -KILL -- "-${pids[$r]}" 2>/dev/null || true
      fi
    done
    deadline=$(($(date +%s) + 5))
  fi
  sleep 0.1
done 2>/dev/null

# Descendants a process left behind (they would keep its output pipe open) go with it.
for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
for pid in "${readers[@]}"; do wait "$pid" 2>/dev/null || true; done
exit "$status"
