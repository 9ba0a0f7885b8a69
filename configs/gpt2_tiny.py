"""lm_tiny as a GPT-2-style model (learned positions, LayerNorm, GELU, biases, tied
embeddings): same size, data and schedule; exports to transformers' GPT2LMHeadModel."""

import runpy
from pathlib import Path

lm_tiny = runpy.run_path(str(Path(__file__).with_name("lm_tiny.py")))["get_config"]


def get_config(arg=None):
    c = lm_tiny(arg)
    # family gpt2 fills the architecture switches; num_kv_heads=0: one KV head per query
    # head, as Hugging Face's GPT-2 has (tiny's 2 KV heads would not export).
    c.model = dict(family="gpt2", size="tiny", num_kv_heads=0, max_positions=256)
    return c
