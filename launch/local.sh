#!/usr/bin/env bash
# launch/local.sh -- run one cxrjax job as N cooperating processes on THIS machine.
#
# What it does: starts N copies of `python -m cxrjax.main` joined by jax.distributed (process 0 is the
# coordinator on localhost:PORT), each with its own slice of the input records and its own share of
# this machine's CPUs (pinned with taskset: the input workers size themselves from them), and waits
# for all of them; if one fails, the others are stopped. Devices: by default each process uses what
# JAX finds (a GPU box: give each process its GPUs with --gpus_per_process). To rehearse a multi-host
# run on a CPU-only machine, --devices_per_process=D gives each process D simulated CPU devices (the
# mechanism the 2-process test in tests/test_distributed.py uses).
# What it costs: nothing but local CPU/GPU time. Logs: WORKDIR/logs/process_<i>.log.
#
#   launch/local.sh --num_processes=2 --devices_per_process=4 \
#       --config=configs/moco_patient.py:demo --workdir=runs/demo-2proc          # CPU rehearsal
#   launch/local.sh --num_processes=8 --gpus_per_process=1 \
#       --config=configs/moco_patient.py --workdir=runs/medaug -- --config.data.dir=data/chexpert   # 8-GPU box
#   launch/local.sh --dry-run --config=configs/moco_patient.py:demo --workdir=runs/x -- --config.seed=1
#
# Options (also from the environment in capitals, e.g. NUM_PROCESSES=2):
#   --num_processes=N          processes to start (default 2)
#   --devices_per_process=D    D simulated CPU devices per process (sets JAX_PLATFORMS=cpu); default 0 =
#                              leave JAX's platform and XLA_FLAGS alone (real accelerators)
#   --gpus_per_process=G       process i sees GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES); default 0 = all
#   --cpus_per_process=C       pin process i to its C CPUs of those this script may use; default: an even
#                              share when there are 2+ processes and at least as many CPUs; 0 = no pinning
#   --port=P                   coordinator port (default: a free one)
#   --config=... --workdir=... passed to cxrjax.main (required); anything after `--` too
#   --python=PATH              interpreter (default: $PYTHON or python3)
#   --dry-run                  print every command and run nothing
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-0}"
GPUS_PER_PROCESS="${GPUS_PER_PROCESS:-0}"
CPUS_PER_PROCESS="${CPUS_PER_PROCESS:-}"
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
    --gpus_per_process=*) GPUS_PER_PROCESS="${1#*=}" ;;
    --cpus_per_process=*) CPUS_PER_PROCESS="${1#*=}" ;;
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
[[ "$GPUS_PER_PROCESS" =~ ^[0-9]+$ ]] || { echo "local.sh: --gpus_per_process must be an integer" >&2; exit 2; }
[[ -z "$CPUS_PER_PROCESS" || "$CPUS_PER_PROCESS" =~ ^[0-9]+$ ]] || { echo "local.sh: --cpus_per_process must be an integer" >&2; exit 2; }

# The CPUs this script may use (its affinity: a container's or a SLURM step's share, not the machine's),
# split into one contiguous share per process.
read -r -a CPUS <<<"$("$PYTHON" -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
if [[ -z "$CPUS_PER_PROCESS" ]]; then  # one process keeps all; fewer CPUs than processes: no pinning
  CPUS_PER_PROCESS=$(( NUM_PROCESSES > 1 ? ${#CPUS[@]} / NUM_PROCESSES : 0 ))
fi
if ((CPUS_PER_PROCESS > 0)) && ! command -v taskset >/dev/null; then
  echo "local.sh: taskset not found (util-linux); the processes are not pinned to CPUs" >&2; CPUS_PER_PROCESS=0
fi
if ((CPUS_PER_PROCESS * NUM_PROCESSES > ${#CPUS[@]})); then
  echo "local.sh: $NUM_PROCESSES processes x $CPUS_PER_PROCESS CPUs > the ${#CPUS[@]} CPUs available to this script" >&2
  exit 2
fi

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

join() { local IFS=,; echo "$*"; }

# One line per process: its CPUs, the environment it gets and the exact cxrjax.main command.
command_for() {
  local i="$1" env=() pin=()
  if ((DEVICES_PER_PROCESS > 0)); then  # simulated CPU devices: asked for explicitly, so the CPU platform too
    env+=("XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" "JAX_PLATFORMS=cpu")
  fi
  if ((GPUS_PER_PROCESS > 0)); then
    env+=("CUDA_VISIBLE_DEVICES=$(join $(seq $((i * GPUS_PER_PROCESS)) $(((i + 1) * GPUS_PER_PROCESS - 1))))")
  fi
  if ((CPUS_PER_PROCESS > 0)); then
    pin=(taskset -c "$(join "${CPUS[@]:$((i * CPUS_PER_PROCESS)):$CPUS_PER_PROCESS}")")
  fi
  CMD=("${pin[@]}" env "${env[@]}" "$PYTHON" -m cxrjax.main "--config=$CONFIG" "--workdir=$WORKDIR"
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
