#!/usr/bin/env bash
# The accelerator measurements of docs/benchmarks.md, on one NVIDIA GPU, as one script:
#   bash scripts/bench/gpu.sh OUT_DIR [PART ...]
# (parts: attention peers125m peers1b stall fp8 moe, and context profile, run when named)
# Each part runs under its own `timeout` and writes its JSON/markdown under OUT_DIR; with no
# parts given, all six run (about 26 minutes on an H200). On a machine whose Python has jax
# with CUDA, torch and transformers but not the rest of bigjax's dependencies, first put
# their wheels in .whl/ (downloaded elsewhere) and set BIGJAX_WHEELS=.whl: they are
# installed without network into a scratch directory. REPS=1 halves the peers and fp8 parts
# (one rep each) for a short lease.
set -uo pipefail
reps=${REPS:-2}
out=${1:?usage: gpu.sh OUT_DIR [PART ...]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(attention peers125m peers1b stall fp8 moe)
mkdir -p "$out"
if [ -n "${BIGJAX_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$BIGJAX_WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$out/gpu.txt" 2>&1
python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda.*|flax|optax|orbax-checkpoint|torch|transformers|nvidia-cudnn.*) ' >> "$out/gpu.txt"

for part in "${parts[@]}"; do
  case $part in
    attention)
      timeout 120 python3 scripts/bench/attention_check.py > "$out/attention.jsonl" 2> "$out/attention.err" ;;
    context)  # the kernel under context parallelism, shard by shard, against one device
      timeout 240 python3 scripts/bench/context_check.py > "$out/context.jsonl" 2> "$out/context.err" ;;
    profile)  # traces of 3 llama_1b steps (8 x 2048): bigjax's and the plain-JAX peer's
      timeout 150 python3 -m bigjax.cli bench --config configs/llama_1b.py --warmup 2 --steps 3 \
        --config.data.batch_size=8 --profile "$out/profile_bigjax" > "$out/profile_bigjax.log" 2>&1
      timeout 120 python3 scripts/bench/peers/plain_jax_gpu.py --size 1b --warmup 2 --steps 3 \
        --profile "$out/profile_plain" > "$out/profile_plain.log" 2>&1 ;;
    peers125m)
      timeout 420 python3 scripts/bench/peers.py --size 125m --reps 3 --steps 10 --warmup 3 \
        --torch-python python3 --out "$out/peers_125m" > "$out/peers_125m.log" 2>&1 ;;
    peers1b)
      timeout 540 python3 scripts/bench/peers.py --size 1b --reps "$reps" --steps 10 --warmup 3 \
        --torch-python python3 --out "$out/peers_1b" > "$out/peers_1b.log" 2>&1 ;;
    stall)  # saves 60 steps (~7 s on an H200) apart: more than one ~1 GB write takes
      timeout 300 python3 scripts/bench/checkpoint_stall.py --config configs/lm_125m.py \
        --saves 3 --before 5 --after 60 --out "$out/stall" > "$out/stall.log" 2>&1 ;;
    fp8)  # llama_1b at one device's micro-batch (8 x 2048, as peers1b), bf16 then fp8
      # projections, alternated; each bench prints tokens/s and MFU (against the bf16 peak),
      # --baseline gives the fp8/bf16 ratios
      for rep in $(seq "$reps"); do
        timeout 150 python3 -m bigjax.cli bench --config configs/llama_1b.py --steps 10 \
          --config.data.batch_size=8 --json "$out/fp8_bf16_$rep.json" > "$out/fp8_bf16_$rep.log" 2>&1
        timeout 150 python3 -m bigjax.cli bench --config configs/llama_1b.py --steps 10 \
          --config.data.batch_size=8 --config.model.matmul_precision=fp8 --json "$out/fp8_fp8_$rep.json" \
          --baseline "$out/fp8_bf16_$rep.json" > "$out/fp8_fp8_$rep.log" 2>&1
      done ;;
    moe)  # a Qwen3-30B-A3B layer: ragged_dot against the tiled scan, bf16 and fp8, the layer
      timeout 300 python3 scripts/bench/moe_speed.py > "$out/moe.log" 2>&1 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
  echo "$part: exit $?" | tee -a "$out/parts.txt"
done
