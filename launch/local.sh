#!/usr/bin/env bash
# Launches N CPU processes of bssl on this machine, talking over loopback, as a
# stand-in for N hosts (tests, laptops). Each process gets the multi-host
# environment protocol read by bssl.parallel.maybe_initialize_distributed:
#   BSSL_DISTRIBUTED=1 BSSL_COORDINATOR_ADDRESS=127.0.0.1:PORT
#   BSSL_NUM_PROCESSES=N BSSL_PROCESS_ID=i
# plus JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D
# (D fake CPU devices per process; cross-process collectives use gloo).
#
# Run `launch/local.sh --help` for the options.
set -euo pipefail

readonly PROG="local.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- PROGRAM_ARGS...]

Starts N CPU processes of `python -m bssl.main PROGRAM_ARGS` on loopback, one per
simulated host, waits for all of them, and fails fast if any one fails.

Options:
  --num_processes N        number of processes (default 2)
  --devices_per_process D  fake CPU devices per process, via
                           XLA_FLAGS=--xla_force_host_platform_device_count=D (default 1)
  --port P                 coordinator port on 127.0.0.1 (default: a free port)
  --log_dir DIR            per-process logs DIR/process_<i>.log (default: <workdir>/logs
                           when --workdir is among the program args, else ./logs)
  --module M               python module to run with `python -m` (default bssl.main)
  --python_script FILE     run this python file instead of a module
  --python PY              python interpreter (default: $PYTHON, else python3)
  --host_dirs DIR          give process i its own working directory and TMPDIR,
                           DIR/host_<i> (as separate hosts with their own disks: only
                           the --workdir is shared); pass absolute --config paths
  --grace_period S         seconds between SIGTERM and SIGKILL when stopping the
                           processes after a failure or a signal (default 30)
  --dry_run                print the command (environment + command line) of each
                           process and exit
  -h, --help               show this help

Everything after `--` is passed to the program unchanged.
Process 0's output is streamed to the terminal; every process also logs to its file.
If a process exits non-zero, the others are stopped (SIGTERM, then SIGKILL after the
grace period) and local.sh exits non-zero naming the process and its log.
Ctrl-C / SIGTERM are forwarded to the processes as SIGTERM (bssl checkpoints on
SIGTERM); a second Ctrl-C kills them.

Example:
  launch/local.sh --num_processes 2 --devices_per_process 4 -- \
      --config=configs/demo.py:tiny --workdir=/tmp/bssl_run
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Run 'launch/local.sh --help' for usage." >&2
  exit 2
}

log() { echo "$PROG: $*" >&2; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)

num_processes=2
devices_per_process=1
port=""
log_dir=""
module="bssl.main"
module_given=0
python_script=""
python_bin="${PYTHON:-python3}"
grace_period=30
dry_run=0
host_dirs=""

# ---------------------------------------------------------------- arguments
# shellcheck source=_lib.sh
source "$script_dir/_lib.sh"
set_option() {
  case $1 in
    --dry_run | --dry-run) dry_run=1 ;;
    --num_processes) num_processes=$2 ;;
    --devices_per_process) devices_per_process=$2 ;;
    --port) port=$2 ;;
    --log_dir) log_dir=$2 ;;
    --host_dirs) host_dirs=$2 ;;
    --module)
      module=$2
      module_given=1
      ;;
    --python_script) python_script=$2 ;;
    --python) python_bin=$2 ;;
    --grace_period) grace_period=$2 ;;
  esac
}
parse_options "--dry_run --dry-run" \
  "--num_processes --devices_per_process --port --log_dir --host_dirs --module --python_script --python --grace_period" \
  "program arguments go after '--'" "$@"
prog_args=("${PROGRAM_ARGS[@]}")

# --------------------------------------------------------------- validation
[[ $num_processes =~ ^[1-9][0-9]*$ ]] ||
  die "--num_processes must be a positive integer, got '$num_processes'"
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] ||
  die "--devices_per_process must be a positive integer, got '$devices_per_process'"
[[ $grace_period =~ ^[0-9]+$ ]] ||
  die "--grace_period must be a non-negative integer (seconds), got '$grace_period'"
if [[ -n $port ]]; then
  if ! [[ $port =~ ^[0-9]+$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "--port must be an integer in 1..65535, got '$port'"
  fi
fi
if [[ -n $python_script ]]; then
  ((module_given == 0)) || die "--module and --python_script are mutually exclusive"
  [[ -f $python_script ]] || die "--python_script: no such file '$python_script'"
else
  [[ $module =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] ||
    die "--module must be a dotted python module name, got '$module'"
fi
command -v "$python_bin" >/dev/null 2>&1 ||
  die "--python: interpreter '$python_bin' not found"

# Default log dir: <workdir>/logs when the program gets a local --workdir.
if [[ -z $log_dir ]]; then
  workdir=""
  for ((k = 0; k < ${#prog_args[@]}; k++)); do
    case ${prog_args[k]} in
      --workdir=*) workdir=${prog_args[k]#--workdir=} ;;
      --workdir) workdir=${prog_args[k + 1]:-} ;;
    esac
  done
  if [[ -n $workdir && $workdir != *://* ]]; then
    log_dir="$workdir/logs"
  else
    log_dir="./logs"
  fi
fi

if [[ -z $port ]]; then
  port=$("$python_bin" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])') || die "could not pick a free port with $python_bin; pass --port"
fi

# XLA_FLAGS: keep the caller's flags, replacing any device-count flag with ours.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] && continue
  xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

coordinator="127.0.0.1:$port"

# The command of process $1, into the global array `cmd`.
build_cmd() {
  local i=$1
  cmd=(env
    "BSSL_DISTRIBUTED=1"
    "BSSL_COORDINATOR_ADDRESS=$coordinator"
    "BSSL_NUM_PROCESSES=$num_processes"
    "BSSL_PROCESS_ID=$i"
    "JAX_PLATFORMS=cpu"
    "XLA_FLAGS=$xla_flags"
    "PYTHONUNBUFFERED=1"
    "PYTHONPATH=$repo_root${PYTHONPATH:+:$PYTHONPATH}")
  if [[ -n $host_dirs ]]; then
    cmd+=("TMPDIR=$host_dirs/host_$i/tmp")
  fi
  cmd+=("$python_bin")
  if [[ -n $python_script ]]; then
    cmd+=("$python_script")
  else
    cmd+=(-m "$module")
  fi
  # ${a[@]+...} keeps `set -u` happy on old bash when there are no program args.
  cmd+=(${prog_args[@]+"${prog_args[@]}"})
}

log_file() { printf '%s/process_%d.log' "$log_dir" "$1"; }

# ------------------------------------------------------------------ dry run
if ((dry_run)); then
  echo "# $PROG dry run: $num_processes process(es) x $devices_per_process CPU device(s)," \
    "coordinator $coordinator, logs in $log_dir"
  for ((i = 0; i < num_processes; i++)); do
    build_cmd "$i"
    echo "# process $i (log: $(log_file "$i"))"
    quote_cmd "${cmd[@]}"
  done
  exit 0
fi

# ---------------------------------------------------------------------- run
mkdir -p "$log_dir"
tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/bssl_local.XXXXXX")
pids=()
running=()
tee_pid=""
signalled=""

kill_all() { # kill_all SIGNAL: signal every still-running process
  local i
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if ((running[i])); then
      kill "-$1" "${pids[i]}" 2>/dev/null || true
    fi
  done
}

any_running() {
  local i
  for ((i = 0; i < ${#pids[@]}; i++)); do
    ((running[i])) && return 0
  done
  return 1
}

reaped=() # "i rc" for each process reaped by the last call of reap
reap() { # wait for the processes that have exited, recording their exit codes
  local i rc
  reaped=()
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if ((running[i])) && ! kill -0 "${pids[i]}" 2>/dev/null; then
      rc=0
      wait "${pids[i]}" || rc=$?
      running[i]=0
      reaped+=("$i $rc")
    fi
  done
}

stop_all() { # SIGTERM everyone, SIGKILL whoever is left after the grace period
  local waited=0
  kill_all TERM
  while any_running && ((waited < grace_period * 5)); do
    sleep 0.2
    reap
    waited=$((waited + 1))
  done
  if any_running; then
    log "processes still running after ${grace_period}s; sending SIGKILL"
    kill_all KILL
    while any_running; do
      sleep 0.1
      reap
    done
  fi
}

cleanup() {
  trap - EXIT INT TERM
  if ((${#pids[@]})) && any_running; then
    kill_all KILL
  fi
  if [[ -n $tee_pid ]]; then
    wait "$tee_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp_dir"
}
trap cleanup EXIT

on_signal() {
  if [[ -n $signalled ]]; then
    log "second $1: killing all processes"
    kill_all KILL
    exit 130
  fi
  signalled=$1
  log "got SIG$1: forwarding SIGTERM to all processes (again to kill them)"
  kill_all TERM
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

# Process 0 writes into a fifo read by tee (log file + terminal), so that we
# hold the pid of the python process itself, not of a pipeline.
fifo="$tmp_dir/process_0.fifo"
mkfifo "$fifo"
tee "$(log_file 0)" <"$fifo" &
tee_pid=$!

log "starting $num_processes process(es) x $devices_per_process device(s), coordinator" \
  "$coordinator; logs in $log_dir/process_<i>.log; streaming process 0"
for ((i = 0; i < num_processes; i++)); do
  build_cmd "$i"
  run_dir=$PWD
  if [[ -n $host_dirs ]]; then
    run_dir="$host_dirs/host_$i"
    mkdir -p "$run_dir/tmp"
  fi
  if ((i == 0)); then
    (cd "$run_dir" && exec "${cmd[@]}") >"$fifo" 2>&1 &
  else
    (cd "$run_dir" && exec "${cmd[@]}") >"$(log_file "$i")" 2>&1 &
  fi
  pids[i]=$!
  running[i]=1
done

failed=""
failed_rc=0
ticks_since_signal=0
while any_running; do
  sleep 0.2
  reap
  for entry in ${reaped[@]+"${reaped[@]}"}; do
    read -r i rc <<<"$entry"
    if ((rc != 0)) && [[ -z $failed && -z $signalled ]]; then
      failed=$i
      failed_rc=$rc
    fi
  done
  [[ -n $failed ]] && break
  if [[ -n $signalled ]]; then
    ticks_since_signal=$((ticks_since_signal + 1))
    if ((ticks_since_signal == grace_period * 5 + 1)); then
      log "processes still running ${grace_period}s after SIGTERM; sending SIGKILL"
      kill_all KILL
    fi
  fi
done

if [[ -n $failed ]]; then
  log_path=$(log_file "$failed")
  # Stop the others first so process 0's stream does not interleave with the report.
  stop_all
  wait "$tee_pid" 2>/dev/null || true
  tee_pid=""
  {
    echo "$PROG: process $failed failed with exit code $failed_rc; log: $log_path"
    if ((failed != 0)); then
      echo "$PROG: last lines of $log_path:"
      tail -n 20 "$log_path" | sed "s/^/  [process $failed] /"
    fi
    echo "$PROG: stopped the other processes"
  } >&2
  exit "$failed_rc"
fi

wait "$tee_pid" 2>/dev/null || true
tee_pid=""
if [[ -n $signalled ]]; then
  log "all processes stopped after SIG$signalled"
  [[ $signalled == INT ]] && exit 130
  exit 143
fi
log "all $num_processes process(es) finished successfully"
