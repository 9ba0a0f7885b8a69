#!/usr/bin/env bash
# Cloud TPU lifecycle for bigjax, with gcloud. Every command accepts --dry-run (print, don't run).
#
#   scripts/tpu/launch.sh create  NAME ZONE ACCELERATOR [RUNTIME]   queued resource, e.g. v5p-128
#   scripts/tpu/launch.sh install NAME ZONE                         this checkout -> every worker
#   scripts/tpu/launch.sh run     NAME ZONE -- bigjax train ...     on every worker, in background
#   scripts/tpu/launch.sh logs    NAME ZONE [WORKER]                follow a worker's log (default 0)
#   scripts/tpu/launch.sh delete  NAME ZONE
#
# Workers join JAX's multi-controller runtime by themselves (BIGJAX_DISTRIBUTED=1 makes
# `bigjax train` call jax.distributed.initialize()). Give --workdir a directory every host
# sees (an NFS or GCS FUSE mount): all hosts write the same checkpoints.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
run() {  # print, then run unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY == 0 ]]; then "$@"; fi
}
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

cmd="${1:-}"; shift || true
[[ $# -ge 2 ]] || usage
NAME="$1"; ZONE="$2"; shift 2
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all)

case "$cmd" in
  create)
    [[ $# -ge 1 ]] || usage
    ACCEL="$1"; RUNTIME="${2:-v2-alpha-tpuv5}"
    run gcloud compute tpus queued-resources create "$NAME" --zone "$ZONE" --node-id "$NAME" \
      --accelerator-type "$ACCEL" --runtime-version "$RUNTIME"
    echo "wait until ACTIVE: gcloud compute tpus queued-resources describe $NAME --zone $ZONE"
    ;;
  install)
    ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
    run tar -C "$ROOT" --exclude=.git --exclude=runs --exclude=data --exclude='.venv' \
      -czf /tmp/bigjax.tgz .
    run gcloud compute tpus tpu-vm scp /tmp/bigjax.tgz "$NAME:~/bigjax.tgz" --zone "$ZONE" \
      --worker=all
    run "${SSH[@]}" --command "mkdir -p ~/bigjax && tar -C ~/bigjax -xzf ~/bigjax.tgz && \
python3 -m venv ~/bigjax-venv && ~/bigjax-venv/bin/pip install -q -e ~/bigjax[tpu]"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    printf -v CMD ' %q' "$@"
    run "${SSH[@]}" --command "cd ~/bigjax && BIGJAX_DISTRIBUTED=1 nohup \
~/bigjax-venv/bin/${CMD# } > ~/bigjax.log 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker="${1:-0}" \
      --command "tail -n 100 -f ~/bigjax.log"
    ;;
  delete)
    run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
    ;;
  *) usage ;;
esac
