"""Masked-language-model corruption (BERT), on device inside the jitted step.

Of the real tokens (segment > 0), `rate` are selected; of those 80 % become the mask id, 10 %
a random token, 10 % stay as they are. The model sees the corrupted row with bidirectional
attention and is scored on the original tokens at the selected positions only. Doing this on
device with the step's key costs nothing on the host, leaves the data pipeline (and its
resumable state) untouched, and gives a new mask every step and every epoch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bigjax.context import in_balanced_order
from bigjax.sharding import Rules

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Masking:
    mask_id: int  # an id the tokenizer never emits (its vocab size), below model.vocab_size
    random_below: int  # random replacements are drawn from [0, random_below): real tokens
    rate: float = 0.15


def corrupt(batch: Batch, key: jax.Array, m: Masking, rules: Rules = ()) -> Batch:
    """The batch with `inputs` corrupted, `targets` = the original tokens and `weights` = 1
    exactly at the selected positions. `rules`: the run's sharding rules; each token's draws
    are the same on any mesh (`context.in_balanced_order`)."""
    tokens_BL = batch["inputs"]
    k_select, k_kind, k_random = jax.random.split(key, 3)
    real_BL = batch["segment_ids"] > 0
    shape = tokens_BL.shape
    select_BL = in_balanced_order(jax.random.uniform(k_select, shape), rules)
    selected_BL = (select_BL < m.rate) & real_BL
    kind_BL = in_balanced_order(jax.random.uniform(k_kind, shape), rules)
    random_BL = in_balanced_order(
        jax.random.randint(k_random, shape, 0, m.random_below, tokens_BL.dtype), rules
    )
    corrupted_BL = jnp.where(
        kind_BL < 0.8, m.mask_id, jnp.where(kind_BL < 0.9, random_BL, tokens_BL)
    )
    return {
        **batch,
        "inputs": jnp.where(selected_BL, corrupted_BL, tokens_BL),
        "targets": tokens_BL,
        "weights": selected_BL.astype(jnp.float32),
    }
