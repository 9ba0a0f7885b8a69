"""Qwen3-30B-A3B-shaped mixture of experts on a TPU v5p slice: dropless, expert parallel.

48 layers of 128 fine-grained SwiGLU experts (width 768), 8 routed per token (3.3 B of the
30.5 B parameters active a token); the experts are split over the FSDP devices (the
`experts` rule takes `fsdp` while the expert axis is 1: 4 a chip on v5p-64, the least memory
of the layouts in docs/scaling.md) and tokens reach them by all-to-all
(bigjax/experts.py). The exchange buffers hold 2x a balanced share
(`moe_exchange_factor`): the balance loss keeps the load near even, and an assignment over
2x is dropped and counted (`moe_dropped`); the worst-case buffers (factor 0) would take
32x the memory. `bigjax plan --config configs/qwen3_moe.py --topology v5p-64` compiles it
(docs/scaling.md, "Mixture of experts").

On NVIDIA GPUs the `platforms` entry switches to the capacity dispatch: there the dropless
grouped products run as a scan of small kernels (no grouped GEMM in XLA:GPU), and one such
layer took 299 ms forward + backward on an H200 against 7.2 ms with capacity 1.25
(docs/benchmarks.md).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.num_steps = 50000
    c.mesh = dict(shape=(1, 1, -1, 1, 1, 1))  # (data, stage, fsdp, context, tensor, expert)
    c.model = dict(
        # Qwen3-30B-A3B's dimensions and routing (without its q/k norms)
        d_model=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        d_ff=768,  # each expert's width
        vocab_size=151936,
        rope_theta=1000000.0,
        num_experts=128,
        experts_per_token=8,
        moe_dispatch="dropless",
        moe_aux_weight=0.001,
        moe_exchange_factor=2.0,
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
    )
    c.optim = dict(lr=3e-4, warmup_steps=2000, schedule="wsd", decay_fraction=0.2)
    c.data = dict(batch_size=128, seq_len=4096)
    c.checkpoint = dict(every_steps=500, keep=3)
    c.metrics = dict(log_every=10)
    c.eval = dict(every_steps=2000, num_batches=16)
    c.platforms = dict(gpu=dict(model=dict(moe_dispatch="capacity")))
    return c
