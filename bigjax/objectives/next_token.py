"""Next-token prediction: language modelling and SFT (SFT's batches weight only the response
tokens; the loss is the same)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bigjax.loss import cross_entropy_sums
from bigjax.models import Model, decoder
from bigjax.objectives.base import Batch, Metrics, Objective, model_inputs


class NextToken(Objective):
    def loss_sums(
        self,
        model: Model,
        batch: Batch,
        rng: jax.Array | None,
        embed_delta: jax.Array | None = None,
    ) -> tuple[Metrics, jax.Array | None]:
        logits_BLV, aux = decoder(model)(
            *model_inputs(batch, rng), with_aux=True, embed_delta=embed_delta
        )
        nll_sum, z_sq_sum = cross_entropy_sums(logits_BLV, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "z_sq_sum": z_sq_sum, **aux}, logits_BLV

    def eval_sums(self, model: Model, batch: Batch, out: Metrics) -> Metrics:
        logits_BLV = decoder(model)(*model_inputs(batch, None))
        nll_sum, _ = cross_entropy_sums(logits_BLV, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "weight_sum": jnp.sum(batch["weights"])}
