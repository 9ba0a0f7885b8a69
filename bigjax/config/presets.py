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

# Named model sizes (the 1b/3b/8b rows are Llama 3.2 1B, 3.2 3B and 3 8B).
# Setting `model.size` fills these; any dimension set explicitly in the config wins.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=384, vocab_size=512),
    "small": dict(
        d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=2048, vocab_size=32000
    ),
    "125m": dict(
        d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, d_ff=2048, vocab_size=32000
    ),
    "350m": dict(
        d_model=1024, num_layers=24, num_heads=16, num_kv_heads=16, d_ff=2816, vocab_size=32000
    ),
    "1b": dict(
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        d_ff=8192,
        vocab_size=128256,
        tie_embeddings=True,
        **LLAMA32_ROPE,
    ),
    "3b": dict(
        d_model=3072,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        d_ff=8192,
        vocab_size=128256,
        tie_embeddings=True,
        **LLAMA32_ROPE,
    ),
    "8b": dict(
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        d_ff=14336,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}

# Families are presets of the one decoder's architecture switches: `model.family='gpt2'` fills
# these, and any field set explicitly in the config wins (like `model.size`). The switches stay
# separate fields so an ablation can change one (say, learned positions in a Llama).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "gpt2": dict(
        positions="learned",
        max_positions=1024,
        norm="layernorm",
        norm_eps=1e-5,
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
    ),
    # An image classifier (data.task=images): patches, a class token, learned positions.
    "vit": dict(
        causal=False,
        positions="learned",
        norm="layernorm",
        norm_eps=1e-6,
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
        vocab_size=1,  # no token table
    ),
    # An encoder for masked-LM pretraining (data.task=mlm). Pre-norm, unlike the original
    # BERT's post-norm: the same blocks as the decoders, and stabler without warmup tricks.
    "bert": dict(
        causal=False,
        positions="learned",
        max_positions=512,
        norm="layernorm",
        norm_eps=1e-12,
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
    ),
}
