"""Next-token prediction: language modelling, SFT (its batches weight only the response
tokens) and masked LM (its inputs masked by `mlm.corrupt` first; the loss is the same)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bigjax import mlm
from bigjax.loss import cross_entropy_sums
from bigjax.models import Model, decoder
from bigjax.objectives.base import Batch, Corrupt, Metrics, Setup, model_inputs
from bigjax.sharding import Rules
from bigjax.tasks import task_of

MLM_STREAM = 0x4D4C4D  # a key stream of its own for the masks


class NextToken:
    def sums(
        self, model: Model, batch: Batch, rng: jax.Array | None, embed_delta: jax.Array | None
    ) -> tuple[Metrics, jax.Array]:
        logits_BLV, aux = decoder(model).logits_and_aux(*model_inputs(batch, rng), embed_delta)
        nll_sum, z_sq_sum = cross_entropy_sums(logits_BLV, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "z_sq_sum": z_sq_sum, **aux}, logits_BLV

    def weight(self, batch: Batch) -> jax.Array:
        return jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def tokens(self, batch: Batch, seq_len: int) -> jax.Array:
        return jnp.sum(batch["weights"])

    def eval_sums(self, model: Model, batch: Batch) -> Metrics:
        logits_BLV = decoder(model)(*model_inputs(batch, None))
        nll_sum, _ = cross_entropy_sums(logits_BLV, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "weight_sum": jnp.sum(batch["weights"])}


def masking_for(setup: Setup) -> Corrupt | None:
    """A masked-LM task's masking; [MASK] is the first id the tokenizer never emits."""
    if not task_of(setup.cfg).masked:
        return None
    size = setup.resources.tokenizer.vocab_size
    m = mlm.Masking(mask_id=size, random_below=size, rate=setup.cfg.data.mlm_rate)
    return masking(m, setup.cfg.mesh.rules)


def masking(m: mlm.Masking, rules: Rules = ()) -> Corrupt:
    """Masked LM's inputs: masked afresh every train step (BERT's 80/10/10), with the same
    mask at every eval (comparable losses), on any mesh (`rules`: the run's)."""

    def corrupt(batch: Batch, key: jax.Array, train: bool) -> Batch:
        key = jax.random.fold_in(key, MLM_STREAM) if train else jax.random.key(MLM_STREAM)
        return mlm.corrupt(batch, key, m, rules)

    return corrupt
