"""nanoGPT-size model (d 512, 8 layers) on the built-in corpus: the CPU benchmark shape."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.num_steps = 2000
    # byte tokenizer: 259 ids, padded to 512.
    c.model = dict(size="small", vocab_size=512)
    c.optim = dict(lr=1e-3, warmup_steps=200)
    c.data = dict(batch_size=8, seq_len=256)
    c.checkpoint = dict(every_steps=500)
    c.eval = dict(every_steps=500)
    c.platforms = dict(
        # 8 unrolled layers compile in seconds; on CPU the unrolled step runs ~6 % faster
        # than the scan (docs/benchmarks.md).
        cpu=dict(model=dict(scan_layers=False)),
        gpu=dict(model=dict(scan_layers=False), micro_batch_per_device=8),
    )
    return c
