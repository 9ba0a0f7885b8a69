"""Model presets: named sizes and families, filled into `model` before conversion.

They live with the config, not with the models, so that loading a config (and reporting its
errors) never imports JAX: a typo is reported in well under a second.
"""

from __future__ import annotations

from typing import Any

# Llama 3.2's RoPE: base 500k, extended 32x from 8k positions with the llama3 bands.
LLAMA32_ROPE = dict(
    rope_theta=500000.0,
    rope_scaling="llama3",
    rope_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_positions=8192,
)

# Named model sizes (the 1b/3b/8b/70b rows are Llama 3.2 1B, 3.2 3B, 3 8B and 3 70B).
# Setting `model.size` fills these; any dimension set explicitly in the config wins.
SIZE_FIELDS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "vocab_size")
MODEL_SIZES: dict[str, dict[str, Any]] = {
    name: dict(zip(SIZE_FIELDS, row, strict=True)) | extra
    for name, row, extra in (
        # name   d_model layers heads kv_heads  d_ff   vocab
        ("tiny",    (128,   2,  4,  2,   384,    512), {}),
        ("small",   (512,   8,  8,  8,  2048,  32000), {}),
        ("125m",    (768,  12, 12, 12,  2048,  32000), {}),
        ("350m",   (1024,  24, 16, 16,  2816,  32000), {}),
        ("1b",     (2048,  16, 32,  8,  8192, 128256), {"tie_embeddings": True, **LLAMA32_ROPE}),
        ("3b",     (3072,  28, 24,  8,  8192, 128256), {"tie_embeddings": True, **LLAMA32_ROPE}),
        ("8b",     (4096,  32, 32,  8, 14336, 128256), {"rope_theta": 500000.0}),
        ("70b",    (8192,  80, 64,  8, 28672, 128256), {"rope_theta": 500000.0}),
    )
}  # fmt: skip

# Families are presets of the one decoder's architecture switches: `model.family='gpt2'` fills
# these, and any field set explicitly in the config wins (like `model.size`). The switches stay
# separate fields so an ablation can change one (say, learned positions in a Llama).
# GPT-2's block (also the ViT's and the pre-norm BERT's): learned positions, LayerNorm, GELU,
# biases, a tied output layer.
GPT2_BLOCKS = dict(
    positions="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True
)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "gpt2": dict(GPT2_BLOCKS, max_positions=1024, norm_eps=1e-5),
    # An image classifier (data.task=images): patches, a class token, learned positions.
    "vit": dict(GPT2_BLOCKS, causal=False, norm_eps=1e-6, vocab_size=1),  # no token table
    # An encoder for masked-LM pretraining (data.task=mlm). Pre-norm, unlike the original
    # BERT's post-norm: the same blocks as the decoders, and stabler without warmup tricks.
    "bert": dict(GPT2_BLOCKS, causal=False, max_positions=512, norm_eps=1e-12),
}
