"""Llama-3-8B-shaped model for a TPU pod slice or GPU cluster: FSDP, full remat, bf16 compute."""

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
    return c
