"""A tiny byte-level LM on the built-in corpus: trains on a 2-core CPU in about two minutes."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 300
    c.model = dict(size="tiny")  # d_model 128, 2 layers, 4 heads (2 kv), d_ff 384, vocab 512
    c.optim = dict(
        name="adamw", lr=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.1, clip_norm=1.0
    )
    c.data = dict(batch_size=16, seq_len=256)
    c.checkpoint = dict(every_steps=100, keep=2)
    c.metrics = dict(log_every=10)
    c.eval = dict(every_steps=100, num_batches=4)
    return c
