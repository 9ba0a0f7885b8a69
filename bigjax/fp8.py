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

Applied by the layers to the dense projections of attention and the MLP and to a MoE's
experts (bigjax/experts.py has the grouped product): never to norms, softmax, the router,
the embedding, the LM head or the loss. Parameters stay in
`model.param_dtype`; only the operands of the product are fp8, inside the step.
"""

from __future__ import annotations

import functools

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


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in fp8 (e4m3 operands, f32 accumulation), in x's dtype. Every
    index of an operand must appear in the other operand or the output (a product, batched or
    not: the two gradients are then einsums of the same kind)."""
    return _forward(spec, x, w)[0]


def matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] in fp8."""
    return einsum("mk,kn->mn", x_MK, w_KN)


def _forward(spec: str, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    xq, x_factor = quantize(x, E4M3)
    wq, w_factor = quantize(w, E4M3)
    y = (_einsum(spec, xq, wq) * (x_factor * w_factor)).astype(x.dtype)
    # the fp8 operands are what the backward needs: a quarter of f32's bytes to keep (and
    # an empty array that carries w's dtype: residuals must be arrays)
    return y, (xq, x_factor, wq, w_factor, jnp.zeros((0,), w.dtype))


def _backward(spec: str, saved: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    xq, x_factor, wq, w_factor, w_dtype = saved
    x_idx, rest = spec.split(",")
    w_idx, out_idx = rest.split("->")
    gq, g_factor = quantize(g, E5M2)
    dx = _einsum(f"{out_idx},{w_idx}->{x_idx}", gq, wq) * (g_factor * w_factor)
    dw = _einsum(f"{x_idx},{out_idx}->{w_idx}", xq, gq) * (x_factor * g_factor)
    return dx.astype(g.dtype), dw.astype(w_dtype.dtype)  # y's dtype is x's


einsum.defvjp(_forward, _backward)
