"""Llama-3-70B-shaped model over two TPU v5p slices: pipeline stages across the slices.

The 80 layers are split into 2 stages, one per slice, joined over the data-center network
(`mesh.dcn_shape` puts the `stage` axis across slices); inside each slice everything is FSDP
over its chips. Each step's 256 rows (1 M tokens) are 2 accumulation micro-batches, each
through the pipeline as 2 micro-batches on the interleaved (circular) schedule with 2 laps:
the bubble is (2 - 1) / (2 x 2 + 2 - 1) = 20 % of the step, and only activations (one
micro-batch's residual stream per tick) cross the slow network, never weights or
gradients. `bigjax plan --config configs/llama_70b.py --topology 2xv5p-128` compiles it for
the two slices: 48.1 GiB a device of 95, what FSDP across the slices needs (docs/scaling.md,
"Deep models", for the other layouts: 4 pipeline micro-batches per step also fit).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.num_steps = 50000
    # (data, stage, fsdp, context, tensor, expert) inside each slice; stages across slices
    c.mesh = dict(shape=(1, 1, -1, 1, 1, 1), dcn_shape=(1, 2, 1, 1, 1, 1))
    c.model = dict(
        size="70b",
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        pipeline_microbatches=2,
        pipeline_interleave=2,
    )
    c.optim = dict(
        lr=1.5e-4, warmup_steps=2000, schedule="wsd", decay_fraction=0.2, grad_accum_steps=2
    )
    c.data = dict(batch_size=256, seq_len=4096)
    c.checkpoint = dict(every_steps=500, keep=3)
    c.metrics = dict(log_every=10)
    c.eval = dict(every_steps=2000, num_batches=16)
    return c
