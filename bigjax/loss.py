"""Next-token cross-entropy over weighted tokens, with optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weighted sums of -log p(target) and of log(Z)^2, in float32.

    Sums rather than means so that micro-batches and data shards combine exactly: the caller
    divides by the total weight of the whole global batch.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum((log_z_BL - target_logit_BL) * weights_BL)
    z_sq_sum = jnp.sum(jnp.square(log_z_BL) * weights_BL)
    return nll_sum, z_sq_sum
