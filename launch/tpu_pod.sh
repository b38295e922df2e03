#!/usr/bin/env bash
# launch/tpu_pod.sh -- run one cxrjax job on a Cloud TPU VM pod slice (every worker runs the same command).
#
# What it does, in order (each step can be skipped; --dry-run prints every command and runs nothing):
#   1. create   gcloud compute tpus tpu-vm create NAME (--accelerator-type, --version, optional --spot)
#   2. setup    copy this checkout to every worker (scp --worker=all), install it with its [tpu] extra, and mount
#               the bucket with gcsfuse at /mnt/BUCKET on every worker (the workdir and data live there:
#               cxrjax writes through ordinary paths; Orbax checkpoints are written by all workers together)
#   3. run      ssh --worker=all: `python -m cxrjax.main --config=... --workdir=/mnt/BUCKET/...` with
#               CXRJAX_DISTRIBUTED=tpu (jax.distributed reads the pod topology from the TPU metadata)
#   4. delete   gcloud compute tpus tpu-vm delete NAME (with --delete; a pod left running keeps billing)
# What it costs (ESTIMATE, check https://cloud.google.com/tpu/pricing for your region and date): TPU v4
# is in the order of $3 per chip-hour on demand, so a v4-32 (16 chips, 4 workers) is roughly $50/hour,
# and about a third of that as --spot. Billing runs from `create` until `delete`.
#
#   launch/tpu_pod.sh --name=cxr-v4 --zone=us-central2-b --type=v4-32 --bucket=my-bucket \
#       --config=configs/moco_patient.py --run=medaug-patient --delete -- --config.data.dir=/mnt/my-bucket/data/chexpert
#   launch/tpu_pod.sh --dry-run --name=cxr-v4 --bucket=my-bucket --config=configs/moco_patient.py:demo --run=demo
#
# Options (also from the environment in capitals, e.g. TPU_NAME, ZONE, BUCKET):
#   --name=NAME --zone=ZONE --project=PROJECT --type=v4-32 --version=tpu-ubuntu2204-base --spot
#   --bucket=BUCKET      GCS bucket (without gs://) holding workdirs (and data) -- required
#   --config=FILE[:variant] --run=NAME   the workdir is /mnt/BUCKET/runs/NAME
#   --steps=create,setup,run             which steps to do (default all three); --delete adds step 4
#   --dry-run            print every command (gcloud ... and the exact cxrjax.main line) and exit
#   anything after `--` is passed to cxrjax.main (config overrides)
set -euo pipefail

TPU_NAME="${TPU_NAME:-cxrjax-pod}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-v4-32}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
BUCKET="${BUCKET:-}"
CONFIG="${CONFIG:-}"
RUN="${RUN:-}"
STEPS="${STEPS:-create,setup,run}"
SPOT=0
DELETE=0
DRY_RUN=0
EXTRA=()
RUN_STATUS=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) TPU_TYPE="${1#*=}" ;;
    --version=*) TPU_VERSION="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}"; BUCKET="${BUCKET#gs://}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --run=*) RUN="${1#*=}" ;;
    --steps=*) STEPS="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --delete) DELETE=1 ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$BUCKET" ]] || { echo "tpu_pod.sh: --bucket is required (the workdir must outlive the VMs)" >&2; exit 2; }
[[ -n "$CONFIG" && -n "$RUN" ]] || { echo "tpu_pod.sh: --config and --run are required" >&2; exit 2; }
((DELETE)) && STEPS="$STEPS,delete"

MOUNT="/mnt/$BUCKET"
WORKDIR="$MOUNT/runs/$RUN"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="/tmp/cxrjax-src.tgz"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

# Print a command so it can be pasted into a shell: plain words as they are, others single-quoted.
show() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  echo "${out[*]}"
}

# Print (dry run) or run one command.
do_cmd() {
  show "$@"
  ((DRY_RUN)) || "$@"
}

MAIN=(python3 -m cxrjax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
REMOTE_SETUP="set -e; mkdir -p ~/cxrjax && tar xzf $TARBALL -C ~/cxrjax && python3 -m pip install -q -U -e \"\$HOME/cxrjax[tpu]\" \
&& (command -v gcsfuse >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) \
&& sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT)"
REMOTE_RUN="cd ~/cxrjax && mkdir -p $WORKDIR && CXRJAX_DISTRIBUTED=tpu $(show "${MAIN[@]}")"

for step in ${STEPS//,/ }; do
  case "$step" in
    create)
      create=("${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$TPU_TYPE" --version="$TPU_VERSION")
      ((SPOT)) && create+=(--spot)
      do_cmd "${create[@]}" ;;
    setup)
      do_cmd tar czf "$TARBALL" -C "$REPO" --exclude=.git --exclude=runs --exclude=data --exclude='*.egg-info' .
      do_cmd "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:$TARBALL" "${WHERE[@]}" --worker=all
      do_cmd "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$REMOTE_SETUP" ;;
    run)  # a failed run still reaches `delete` (a pod left running keeps billing)
      do_cmd "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$REMOTE_RUN" || RUN_STATUS=$? ;;
    delete)
      do_cmd "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet ;;
    *) echo "tpu_pod.sh: unknown step $step (create, setup, run, delete)" >&2; exit 2 ;;
  esac
done
exit "${RUN_STATUS:-0}"
