"""Llama-3-8B-shaped model for a TPU pod slice or GPU cluster: FSDP, bf16 compute.

Attention is `auto` (splash on TPUs, cuDNN on NVIDIA GPUs); `platforms` holds the memory
policy per kind of device (bigjax/mesh.py). `bigjax plan --config configs/llama_8b.py
--topology v5p-128` compiles it for that slice (docs/scaling.md).

`configs/llama_8b.py:128k` trains on 131072-token rows: each row's sequence split over 8
context devices (16384 tokens each, causal load balanced), FSDP over the rest; one row of
131072 tokens on one device does not fit a v5p (plan: docs/scaling.md, "Long sequences").
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.num_steps = 50000
    c.mesh = dict(shape=(1, -1, 1))
    c.model = dict(size="8b", dtype="bfloat16", param_dtype="float32", remat="full")
    c.optim = dict(lr=3e-4, warmup_steps=2000, schedule="wsd", decay_fraction=0.2)
    c.data = dict(batch_size=256, seq_len=4096)
    c.checkpoint = dict(every_steps=500, keep=3)
    c.metrics = dict(log_every=10)
    c.eval = dict(every_steps=2000, num_batches=16)
    c.platforms = dict(
        # H100/H200 (80/141 GB): one 4096-token row a micro-batch keeps the matmul outputs.
        gpu=dict(model=dict(remat="save_matmuls"), micro_batch_per_device=1),
        tpu=dict(model=dict(remat="full")),
    )
    if arg == "128k":
        c.mesh = dict(shape=(1, 1, -1, 8, 1, 1))  # (data, stage, fsdp, context, tensor, expert)
        c.data = dict(batch_size=16, seq_len=131072)  # 2M tokens a step
    elif arg:
        raise ValueError(f"configs/llama_8b.py: unknown argument {arg!r}; use 128k or none")
    return c
