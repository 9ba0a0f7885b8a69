"""FP8 matrix multiplications with per-tensor dynamic scaling (`model.matmul_precision=fp8`).

Forward: both operands quantised to float8 e4m3 (more mantissa: activations and weights);
backward: the incoming gradient to e5m2 (more range: gradients), multiplied against the
forward's saved e4m3 operands. Each tensor gets its own scale, from its current absolute
maximum, so that the largest value lands on the format's largest; the product is taken in
fp8 with f32 accumulation and scaled back. This is torchao's "tensorwise" recipe (the one
behind torchtitan's 1.28x on H100), chosen over flax's delayed scaling (amax histories kept
in a separate variable collection and updated by a special gradient rule): it needs no state,
so checkpoints, the optimizer and resumption are untouched, and the one extra reduction per
operand (its amax, a cross-device max when sharded) fuses into the quantising pass.

Applied by the layers to the dense projections of attention and the MLP only: never to
norms, softmax, the router, the embedding, the LM head or the loss. Parameters stay in
`model.param_dtype`; only the operands of the product are fp8, inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn  # forward operands: 3 mantissa bits, max 448
E5M2 = jnp.float8_e5m2  # gradients: 2 mantissa bits, max 57344


def quantize(x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """(x in `dtype`, the f32 factor that turns it back): x's absolute maximum maps to the
    format's largest finite value; an all-zero tensor keeps factor 1."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    top = float(jnp.finfo(dtype).max)
    scale = jnp.where(amax > 0, top / amax, 1.0)
    q = jnp.clip(x.astype(jnp.float32) * scale, -top, top).astype(dtype)
    return q, 1.0 / scale


def dequantize(q: jax.Array, factor: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return (q.astype(jnp.float32) * factor).astype(dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] in fp8 (e4m3 operands, f32 accumulation), in x's dtype."""
    return _forward(x_MK, w_KN)[0]


def _forward(x_MK: jax.Array, w_KN: jax.Array) -> tuple[jax.Array, tuple]:
    xq, x_factor = quantize(x_MK, E4M3)
    wq, w_factor = quantize(w_KN, E4M3)
    y_MN = (_dot(xq, wq, (1, 0)) * (x_factor * w_factor)).astype(x_MK.dtype)
    # the fp8 operands are what the backward needs: a quarter of f32's bytes to keep (and
    # an empty array that carries w's dtype: residuals must be arrays)
    return y_MN, (xq, x_factor, wq, w_factor, jnp.zeros((0,), w_KN.dtype))


def _backward(saved: tuple, g_MN: jax.Array) -> tuple[jax.Array, jax.Array]:
    xq, x_factor, wq, w_factor, w_dtype = saved
    gq, g_factor = quantize(g_MN, E5M2)
    dx_MK = (_dot(gq, wq, (1, 1)) * (g_factor * w_factor)).astype(g_MN.dtype)  # y's = x's
    dw_KN = (_dot(xq, gq, (0, 0)) * (x_factor * g_factor)).astype(w_dtype.dtype)
    return dx_MK, dw_KN


matmul.defvjp(_forward, _backward)
