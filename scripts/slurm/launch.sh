#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes an sbatch script and submits it.
#
#   scripts/slurm/launch.sh NODES GPUS_PER_NODE [--dry-run] -- bigjax train --config ... --workdir ...
#
# One task per node; each task sees its node's GPUs, and `bigjax train` joins JAX's
# multi-controller runtime from the SLURM environment (jax.distributed.initialize()).
# --dry-run (anywhere before `--`) prints the script instead of submitting it. Extra sbatch
# options: SBATCH_ARGS.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2; }

DRY=0; ARGS=()
while (( $# )); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --) ARGS+=("$@"); break ;;
    -*) echo "unknown option $1 (--dry-run is the only one; the command goes after --)" >&2
        exit 2 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
set -- ${ARGS[@]+"${ARGS[@]}"}
if [[ $# -lt 4 || "$3" != "--" ]]; then usage; fi
for n in "$1" "$2"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "NODES and GPUS_PER_NODE must be positive integers, not '$n'" >&2; exit 2; }
done
NODES="$1"; GPUS="$2"; shift 3
printf -v CMD ' %q' "$@"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"

SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=bigjax
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${GPUS}
#SBATCH --output=bigjax-%j.log
set -euo pipefail
cd ${ROOT}
export BIGJAX_DISTRIBUTED=1
srun --kill-on-bad-exit=1${CMD}"

if [[ $DRY == 1 ]]; then
  echo "$SCRIPT"
  echo "+ sbatch ${SBATCH_ARGS:-}<script>"
else
  echo "$SCRIPT" | sbatch ${SBATCH_ARGS:-}
fi
