"""Llama-3.2-1B-shaped model for one GPU/TPU host: bf16 compute, f32 params, FSDP over all
devices. Pass `:tp` to also use 2-way tensor parallelism (e.g. `configs/llama_1b.py:tp`)."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.num_steps = 10000
    c.mesh = dict(shape=(1, -1, 2) if arg == "tp" else (1, -1, 1))
    c.model = dict(
        size="1b", dtype="bfloat16", param_dtype="float32", remat="save_matmuls", attention="xla"
    )
    c.optim = dict(lr=3e-4, warmup_steps=1000, schedule="cosine")
    c.data = dict(batch_size=64, seq_len=2048)
    c.checkpoint = dict(every_steps=1000, keep=3)
    c.metrics = dict(log_every=10)
    c.eval = dict(every_steps=1000, num_batches=8)
    return c
