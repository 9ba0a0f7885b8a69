"""A 125M-class decoder (d 768, 12 layers, 12 heads) on the built-in corpus, byte vocabulary:
the model size of GPT-2 small, and the accelerator benchmark's small shape (batch 32 x 1024).

On a 2-core CPU a step of the full batch takes over a minute; the CPU entry splits it into
micro-batches of 4 rows so the memory stays small.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.num_steps = 5000
    c.model = dict(size="125m", vocab_size=512)  # byte tokenizer: 259 ids, padded to 512
    c.optim = dict(lr=6e-4, warmup_steps=500)
    c.data = dict(batch_size=32, seq_len=1024)
    c.checkpoint = dict(every_steps=1000, keep=2)
    c.metrics = dict(log_every=10)
    c.eval = dict(every_steps=1000, num_batches=4)
    c.platforms = dict(
        # bf16 compute, f32 params; 32 rows of 1024 fit one H100/H200 without remat.
        gpu=dict(
            model=dict(dtype="bfloat16", remat="none", scan_layers=False),
            micro_batch_per_device=32,
        ),
        tpu=dict(model=dict(dtype="bfloat16", remat="none"), micro_batch_per_device=32),
        cpu=dict(model=dict(scan_layers=False), micro_batch_per_device=4),
    )
    return c
