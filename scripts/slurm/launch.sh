#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes an sbatch script and submits it.
#
#   scripts/slurm/launch.sh [--dry-run] NODES GPUS_PER_NODE -- bigjax train --config ... --workdir ...
#
# One task per node; each task sees its node's GPUs, and `bigjax train` joins JAX's
# multi-controller runtime from the SLURM environment (jax.distributed.initialize()).
# --dry-run prints the script instead of submitting it. Extra sbatch options: SBATCH_ARGS.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -lt 4 || "$3" != "--" ]]; then sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
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
