"""The model shapes the accelerator peers share (bigjax's presets, written out so the peers
need no bigjax import): Llama blocks, RoPE, SwiGLU, grouped-query attention."""

SHAPES = {
    # GPT-2-small-sized Llama on bytes: configs/lm_125m.py
    "125m": dict(d=768, layers=12, heads=12, kv_heads=12, ff=2048, vocab=512, tied=False,
                 batch=32, seq=1024, theta=10000.0, config="configs/lm_125m.py"),
    # Llama 3.2 1B: configs/llama_1b.py, one device's micro-batch of 8 x 2048
    "1b": dict(d=2048, layers=16, heads=32, kv_heads=8, ff=8192, vocab=128256, tied=True,
               batch=8, seq=2048, theta=500000.0, config="configs/llama_1b.py"),
    # for trying the scripts on a CPU in seconds
    "tiny": dict(d=128, layers=2, heads=4, kv_heads=2, ff=384, vocab=512, tied=False,
                 batch=4, seq=128, theta=10000.0, config="configs/lm_tiny.py"),
}  # fmt: skip
