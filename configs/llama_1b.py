"""Llama-3.2-1B-shaped model for one GPU/TPU host: bf16 compute, f32 params, FSDP over all
devices. Pass `:tp` to also use 2-way tensor parallelism (e.g. `configs/llama_1b.py:tp`).

Attention is `auto` (cuDNN flash attention on NVIDIA GPUs, splash on TPUs). `platforms` holds
what runs fastest on each kind of device (bigjax/mesh.py); the global batch of 64 x 2048 is
the same everywhere, only its micro-batching differs. Measured on one H200 (docs/benchmarks.md):
no remat and unrolled layers; 8 rows of 2048 per device fit in its 141 GB.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.num_steps = 10000
    c.mesh = dict(shape=(1, -1, 2) if arg == "tp" else (1, -1, 1))
    c.model = dict(size="1b", dtype="bfloat16", param_dtype="float32", remat="save_matmuls")
    c.optim = dict(lr=3e-4, warmup_steps=1000, schedule="cosine")
    c.data = dict(batch_size=64, seq_len=2048)
    c.checkpoint = dict(every_steps=1000, keep=3)
    c.metrics = dict(log_every=10)
    c.eval = dict(every_steps=1000, num_batches=8)
    c.platforms = dict(
        gpu=dict(model=dict(remat="none", scan_layers=False), micro_batch_per_device=8),
        # v5p/v4 (95/32 GB HBM): matmul outputs saved, the rest recomputed; 8 rows a device.
        tpu=dict(model=dict(remat="save_matmuls"), micro_batch_per_device=8),
    )
    return c
