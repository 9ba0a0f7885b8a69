"""Text corruption for robustness: token dropout (random replacements) and span masking of
the inputs, afresh every train step (targets and weights unchanged; eval sees clean text)."""

from __future__ import annotations

import jax

from bigjax import robust
from bigjax.objectives.base import Batch, Corrupt, Setup
from bigjax.sharding import Rules

TEXT_STREAM = 0x545854  # a key stream of its own


def text_noise_for(setup: Setup) -> Corrupt | None:
    """robust.token_dropout and span_mask; [MASK] and the random ids as masked LM's."""
    r, size = setup.cfg.robust, setup.resources.tokenizer.vocab_size
    if not (r.token_dropout or r.span_mask):
        return None
    noise = robust.TextNoise(r.token_dropout, r.span_mask, r.span_length, size, size)
    return text_noise(noise, setup.cfg.mesh.rules)


def text_noise(noise: robust.TextNoise, rules: Rules = ()) -> Corrupt:
    def corrupt(batch: Batch, key: jax.Array, train: bool) -> Batch:
        if not train:
            return batch
        return robust.corrupt_text(batch, jax.random.fold_in(key, TEXT_STREAM), noise, rules)

    return corrupt
