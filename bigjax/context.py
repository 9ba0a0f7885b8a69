"""Context parallelism: each sequence split over the mesh's `context` axis.

Every activation's sequence dim is sharded over `context` (the `act_seq` rule), so a device
holds 1/C of each row's tokens and the matmuls, norms and the loss need no communication.
Attention is the one place tokens meet: each device all-gathers the keys and values of its
rows over `context` (the backward pass reduce-scatters their gradients) and attends its own
queries to them with the backend's kernel, under `shard_map`.

Why all-gather and not a ring: with grouped queries the keys and values are H/G times smaller
than the queries (4x for Llama 3 8B), so gathering them moves as many bytes as a ring's C-1
hops do, in one collective XLA can schedule early (the next layer's gather overlaps this
layer's compute), and any mask works (packed documents, here) without a ring's per-hop
bookkeeping; Llama 3 was trained this way. What a ring saves is the memory of the gathered
keys and values, one layer at a time: `plan` reports it (docs/scaling.md).

Causal load balancing: cut into 2C chunks, row order 0..2C-1, device i holds chunks i and
2C-1-i, so each device has as many early (cheap) as late (expensive) queries. The batch is
put in that order on the host (`balance`, free) and the attention knows each query's place
from the same static order (`chunk_order`); the loss is a sum over tokens, so nothing else
depends on the order. Documents crossing chunk boundaries are attended right because the
masks compare segment ids and the tokens' places in the row, never shard-local indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from bigjax.sharding import CONTEXT_AXIS as AXIS
from bigjax.sharding import Rules, attention_specs, context_parts


@dataclasses.dataclass(frozen=True)
class Shard:
    """One device's part of the attention: its queries (balanced order), its rows' keys and
    values gathered whole in row order, the segment ids of both, and the queries' places in
    the row."""

    q_BQHK: jax.Array
    k_BLGK: jax.Array
    v_BLGK: jax.Array
    q_ids_BQ: jax.Array
    kv_ids_BL: jax.Array
    places_Q: jax.Array


Inner = Callable[..., jax.Array]  # (Shard, *extra) -> out [B, Q, H, K]


def chunk_order(seq_len: int, num_parts: int) -> np.ndarray:
    """The load-balanced order [L]: entry j is the place in the row of the token that the
    balanced row holds at j. Device i's shard is chunks i and 2C-1-i of 2C."""
    if num_parts == 1:
        return np.arange(seq_len)
    chunks = np.arange(seq_len).reshape(2 * num_parts, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(num_parts)])


def balance(
    batch: Mapping[str, np.ndarray], seq_dims: Mapping[str, int], num_parts: int
) -> dict[str, np.ndarray]:
    """The host batch with every sequence dim (`seq_dims`: field -> dim) in load-balanced
    order; other fields as they are."""
    if num_parts == 1:
        return dict(batch)
    out = {}
    for key, array in batch.items():
        dim = seq_dims.get(key)
        out[key] = (
            array
            if dim is None
            else np.take(array, chunk_order(array.shape[dim], num_parts), axis=dim)
        )
    return out


def _parts(x_BL: jax.Array, rules: Rules) -> int:
    """Into how many parts the mesh being traced for cuts dim 1 of `x_BL` (1: outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else context_parts(rules, dict(mesh.shape), x_BL.shape[1])


def in_balanced_order(x_BL: jax.Array, rules: Rules) -> jax.Array:
    """`x_BL`, made for the row's own order of places (a random draw per token, masked
    spans), moved to the order the step's batch holds each sequence in: load-balanced when
    the mesh's context axis splits it (`balance`). What is drawn for a token then does not
    depend on the mesh: the same masks on any context size, and a span covers neighbours in
    the row, not in the balanced order. Outside a mesh, or with one part, `x_BL` itself."""
    parts = _parts(x_BL, rules)
    if parts == 1:
        return x_BL
    return jnp.take(x_BL, chunk_order(x_BL.shape[1], parts), axis=1)


def in_row_order(x_BL: jax.Array, rules: Rules) -> jax.Array:
    """The inverse of `in_balanced_order`: a step's `x_BL` with dim 1 in the row's order,
    for what counts along the row (MoE capacity: earlier tokens first)."""
    parts = _parts(x_BL, rules)
    if parts == 1:
        return x_BL
    return jnp.take(x_BL, np.argsort(chunk_order(x_BL.shape[1], parts)), axis=1)


def attend(
    inner: Inner,
    q_BLHK: jax.Array,
    k_BLGK: jax.Array,
    v_BLGK: jax.Array,
    segment_ids_BL: jax.Array,
    *,
    causal: bool,
    rules: Rules,
    extra: tuple[object, ...] = (),
    extra_specs: tuple[object, ...] = (),
) -> jax.Array:
    """Attention of a balanced, context-sharded batch: `inner` on each device's `Shard`
    under `shard_map` over the batch, context and head shards. `extra` (with their shard_map
    specs) are passed on to `inner`: a kernel whose mask is split by query shard."""
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    length, num_parts = q_BLHK.shape[1], sizes[AXIS]
    order = chunk_order(length, num_parts)
    natural = np.argsort(order)  # balanced -> row order
    batch, heads, kv_heads = attention_specs(rules, sizes, q_BLHK.shape[0], q_BLHK.shape[2],
                                             k_BLGK.shape[2])  # fmt: skip
    q_spec = PartitionSpec(batch, AXIS, heads, None)
    kv_spec = PartitionSpec(batch, AXIS, kv_heads, None)

    def local(
        q_BQHK: jax.Array,
        k_BQGK: jax.Array,
        v_BQGK: jax.Array,
        segment_ids_BQ: jax.Array,
        *extra: object,
    ) -> jax.Array:
        def gathered(x: jax.Array) -> jax.Array:  # every shard's, back in row order
            return jnp.take(jax.lax.all_gather(x, AXIS, axis=1, tiled=True), natural, axis=1)

        places_Q = jnp.asarray(order.reshape(num_parts, -1))[jax.lax.axis_index(AXIS)]
        shard = Shard(q_BQHK, gathered(k_BQGK), gathered(v_BQGK), segment_ids_BQ,
                      gathered(segment_ids_BQ), places_Q)  # fmt: skip
        return inner(shard, *extra)

    return jax.shard_map(
        local,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(batch, AXIS), *extra_specs),
        out_specs=q_spec,
        check_vma=False,
    )(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, *extra)


def mask(shard: Shard, causal: bool) -> jax.Array:
    """[B, 1, Q, L] bool: a shard's queries attend to keys (in row order) of their own
    document, and (decoders) at or before their place in the row."""
    same_doc_BQL = shard.q_ids_BQ[:, :, None] == shard.kv_ids_BL[:, None, :]
    if causal:
        places_L = jnp.arange(shard.kv_ids_BL.shape[1])
        same_doc_BQL &= (places_L[None, :] <= shard.places_Q[:, None])[None]
    return same_doc_BQL[:, None]
