#!/usr/bin/env bash
# Cloud TPU lifecycle for bigjax, with gcloud. Every command accepts --dry-run anywhere before
# `--` (print the gcloud commands, run nothing); `delete` asks first unless --yes.
#
#   scripts/tpu/launch.sh create  NAME ZONE ACCELERATOR [RUNTIME]   queued resource, e.g. v5p-128
#   scripts/tpu/launch.sh install NAME ZONE                         this checkout -> every worker
#   scripts/tpu/launch.sh run     NAME ZONE -- bigjax train ...     on every worker, in background
#   scripts/tpu/launch.sh logs    NAME ZONE [WORKER]                follow a worker's log (default 0)
#   scripts/tpu/launch.sh delete  NAME ZONE [--yes]                 asks before deleting
#
# Multi-slice: SLICES=N before any of these creates N slices (nodes NAME-0 .. NAME-(N-1)) in one
# queued resource and acts on all of them; train with --config.mesh.dcn_shape=N,1,1.
#
# Workers join JAX's multi-controller runtime by themselves (BIGJAX_DISTRIBUTED=1 makes
# `bigjax train` call jax.distributed.initialize()). Give --workdir a directory every host
# sees (an NFS or GCS FUSE mount): all hosts write the same checkpoints.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }

# Options anywhere before `--` (after it is the command to run, left alone). An unknown option
# is an error, so that a misspelt --dry-run never runs gcloud for real.
DRY=0; YES=0; ARGS=()
while (( $# )); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --yes) YES=1 ;;
    --) ARGS+=("$@"); break ;;
    -*) echo "unknown option $1 (options: --dry-run, --yes; the command to run goes after --)" >&2
        exit 2 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
set -- ${ARGS[@]+"${ARGS[@]}"}

run() {  # print, then run unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY == 0 ]]; then "$@"; fi
}
confirm() {  # confirm QUESTION: go on only with --yes or a typed yes
  if [[ $DRY == 1 || $YES == 1 ]]; then return 0; fi
  local answer=""
  printf '%s [y/N] ' "$1" >&2
  read -r answer || true
  if [[ ! "$answer" =~ ^([yY]|[yY][eE][sS])$ ]]; then
    echo "not confirmed: nothing deleted (--yes skips this question)" >&2
    exit 1
  fi
}

cmd="${1:-}"; shift || true
[[ $# -ge 2 ]] || usage
NAME="$1"; ZONE="$2"; shift 2
SLICES="${SLICES:-1}"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "SLICES must be a positive integer" >&2; exit 2; }
NODES=("$NAME")
if (( SLICES > 1 )); then NODES=(); for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done; fi
ssh_all() {  # ssh_all COMMAND: on every worker of every slice
  for node in "${NODES[@]}"; do
    run gcloud compute tpus tpu-vm ssh "$node" --zone "$ZONE" --worker=all --command "$1"
  done
}

case "$cmd" in
  create)
    [[ $# -ge 1 ]] || usage
    ACCEL="$1"; RUNTIME="${2:-v2-alpha-tpuv5}"
    if (( SLICES > 1 )); then NODE_ARGS=(--node-count "$SLICES" --node-prefix "$NAME")
    else NODE_ARGS=(--node-id "$NAME"); fi
    run gcloud compute tpus queued-resources create "$NAME" --zone "$ZONE" "${NODE_ARGS[@]}" \
      --accelerator-type "$ACCEL" --runtime-version "$RUNTIME"
    echo "wait until ACTIVE: gcloud compute tpus queued-resources describe $NAME --zone $ZONE"
    ;;
  install)
    ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
    TGZ="$(mktemp -d)/bigjax.tgz"
    run tar -C "$ROOT" --exclude=.git --exclude=runs --exclude=data --exclude='.venv' \
      -czf "$TGZ" .
    for node in "${NODES[@]}"; do
      run gcloud compute tpus tpu-vm scp "$TGZ" "$node:~/bigjax.tgz" --zone "$ZONE" --worker=all
    done
    ssh_all "mkdir -p ~/bigjax && tar -C ~/bigjax -xzf ~/bigjax.tgz && \
python3 -m venv ~/bigjax-venv && ~/bigjax-venv/bin/pip install -q -e ~/bigjax[tpu]"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -ge 1 ]] || usage
    printf -v CMD ' %q' "$@"
    ssh_all "cd ~/bigjax && BIGJAX_DISTRIBUTED=1 nohup ~/bigjax-venv/bin/${CMD# } \
> ~/bigjax.log 2>&1 &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "${NODES[0]}" --zone "$ZONE" --worker="${1:-0}" \
      --command "tail -n 100 -f ~/bigjax.log"
    ;;
  delete)
    confirm "Delete queued resource $NAME in $ZONE and its TPU VMs (${NODES[*]})?"
    run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
    ;;
  *) usage ;;
esac
