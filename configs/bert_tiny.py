"""A tiny BERT-style encoder pretrained with masked LM on the built-in corpus (same size,
data and schedule as lm_tiny): bidirectional attention, learned positions, LayerNorm, GELU,
biases; 15 % of tokens masked on device every step (80 % [MASK], 10 % random, 10 % kept)."""

import runpy
from pathlib import Path

lm_tiny = runpy.run_path(str(Path(__file__).with_name("lm_tiny.py")))["get_config"]


def get_config(arg=None):
    c = lm_tiny(arg)
    c.model = dict(family="bert", size="tiny", max_positions=256)
    c.data = dict(c.data, task="mlm", mlm_rate=0.15)
    return c
