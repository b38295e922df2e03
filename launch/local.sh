#!/usr/bin/env bash
# launch/local.sh -- run one cxrjax job as N cooperating processes on THIS machine.
#
# What it does: starts N copies of `python -m cxrjax.main` joined by jax.distributed (process 0 is the
# coordinator on localhost:PORT), each with its own slice of the input records, and waits for all of
# them; if one fails, the others are stopped. On a CPU-only machine each process gets
# --devices_per_process simulated devices, so N x D devices rehearse a multi-host run (the mechanism
# the 2-process test in tests/test_distributed.py uses). On a GPU box, pass --devices_per_process=0
# and use CUDA_VISIBLE_DEVICES per process yourself, or simply run one process with all GPUs.
# What it costs: nothing but local CPU/GPU time. Logs: WORKDIR/logs/process_<i>.log.
#
#   launch/local.sh --num_processes=2 --devices_per_process=4 \
#       --config=configs/moco_patient.py:demo --workdir=runs/demo-2proc
#   launch/local.sh --dry-run --config=configs/moco_patient.py:demo --workdir=runs/x -- --config.seed=1
#
# Options (also from the environment in capitals, e.g. NUM_PROCESSES=2):
#   --num_processes=N          processes to start (default 2)
#   --devices_per_process=D    simulated CPU devices per process (default 4; 0 = leave XLA_FLAGS alone)
#   --port=P                   coordinator port (default: a free one)
#   --config=... --workdir=... passed to cxrjax.main (required); anything after `--` too
#   --python=PATH              interpreter (default: $PYTHON or python3)
#   --dry-run                  print every command and run nothing
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PORT="${PORT:-}"
PYTHON="${PYTHON:-python3}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
DRY_RUN=0
EXTRA=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --num_processes=*) NUM_PROCESSES="${1#*=}" ;;
    --devices_per_process=*) DEVICES_PER_PROCESS="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "local.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$CONFIG" && -n "$WORKDIR" ]] || { echo "local.sh: --config and --workdir are required" >&2; exit 2; }
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: --num_processes must be a positive integer" >&2; exit 2; }
[[ "$DEVICES_PER_PROCESS" =~ ^[0-9]+$ ]] || { echo "local.sh: --devices_per_process must be an integer" >&2; exit 2; }

if [[ -z "$PORT" ]]; then
  if ((DRY_RUN)); then PORT=12355; else
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
  fi
fi

# Print a command so it can be pasted into a shell: plain words as they are, others single-quoted.
show() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  echo "${out[*]}"
}

# One line per process: the environment it gets and the exact cxrjax.main command.
command_for() {
  local i="$1" env=()
  if ((DEVICES_PER_PROCESS > 0)); then
    env=("XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" "JAX_PLATFORMS=cpu")
  fi
  CMD=(env "${env[@]}" "$PYTHON" -m cxrjax.main "--config=$CONFIG" "--workdir=$WORKDIR"
       "--coordinator_address=localhost:$PORT" "--num_processes=$NUM_PROCESSES" "--process_id=$i" "${EXTRA[@]}")
}

if ((DRY_RUN)); then
  show mkdir -p "$WORKDIR/logs"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    command_for "$i"
    echo "$(show "${CMD[@]}") > $(show "$WORKDIR/logs/process_$i.log") 2>&1 &"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$WORKDIR/logs"
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  command_for "$i"
  "${CMD[@]}" >"$WORKDIR/logs/process_$i.log" 2>&1 &
  PIDS+=("$!")
done
echo "local.sh: $NUM_PROCESSES processes on localhost:$PORT; logs in $WORKDIR/logs/ (process 0 shows progress)"
STATUS=0
for i in "${!PIDS[@]}"; do
  if ! wait "${PIDS[$i]}"; then
    echo "local.sh: process $i failed; see $WORKDIR/logs/process_$i.log" >&2
    STATUS=1
    stop_all
  fi
done
exit "$STATUS"
