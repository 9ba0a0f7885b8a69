"""Text corruption for robustness: token dropout (random replacements) and span masking of
the inputs, afresh every train step (targets and weights unchanged; eval sees clean text)."""

from __future__ import annotations

import dataclasses

import jax

from bigjax import robust
from bigjax.objectives.base import Batch, Objective

TEXT_STREAM = 0x545854  # a key stream of its own


@dataclasses.dataclass(frozen=True)
class TextNoise(Objective):
    noise: robust.TextNoise

    def corrupt(self, batch: Batch, key: jax.Array, train: bool) -> Batch:
        if not train:
            return batch
        return robust.corrupt_text(batch, jax.random.fold_in(key, TEXT_STREAM), self.noise)
