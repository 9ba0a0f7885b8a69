"""Masked language modelling: next-token's loss on a batch whose inputs are masked afresh
every step (BERT's 80/10/10), with the same mask at every eval (comparable losses)."""

from __future__ import annotations

import dataclasses

import jax

from bigjax import mlm
from bigjax.objectives.base import Batch
from bigjax.objectives.next_token import NextToken

MLM_STREAM = 0x4D4C4D  # a key stream of its own for the masks


@dataclasses.dataclass(frozen=True)
class MaskedLM(NextToken):
    masking: mlm.Masking

    def corrupt(self, batch: Batch, key: jax.Array, train: bool) -> Batch:
        key = jax.random.fold_in(key, MLM_STREAM) if train else jax.random.key(MLM_STREAM)
        return mlm.corrupt(batch, key, self.masking)
