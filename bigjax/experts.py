"""Dropless expert computation: every routed (token, expert) pair through its expert, with
grouped matrix multiplications, and expert parallelism by all-to-all.

Tokens are sorted by expert and each expert's rows multiplied in one `jax.lax.ragged_dot`
(XLA's grouped GEMM: megablox-style kernels on TPU/GPU), so memory and FLOPs grow with the
k assignments per token, not with E x capacity as in the one-hot dispatch.

Expert parallelism: the expert weights [E, ...] are split over the mesh axes of the `experts`
rule (the EP group: by default the `expert` axis, then `fsdp` while E divides), which must
also split the tokens (where a batch has too few rows to split, as one generated sequence,
the experts are gathered instead). Under `shard_map`
each device routes its own tokens, sends every assignment to the device holding its expert
(`all_to_all` over the EP group), runs its E/EP local experts on what it received, and sends
the results back. The exchange uses fixed-size buffers: by default each destination's slot
holds all of a device's assignments (the worst case: dropless whatever the routing);
`exchange_factor` f < EP sizes it f x the balanced share instead (less memory and traffic;
assignments over it are dropped and counted). `ragged_all_to_all` would send only what is
routed, but XLA:CPU does not implement it, so it could not be tested here.

Tensor parallelism inside: the expert width F is split over the `mlp` rule's axes; the down
projection's partial sums are reduced over them (psum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bigjax import fp8 as fp8_ops
from bigjax.sharding import Rules, logical_to_spec, trace_platform


@dataclass(frozen=True)
class Layout:
    """The mesh axes of one dropless MoE call: tokens' batch and sequence dims, the EP group
    (expert dim of the weights) and the expert width (tensor parallel)."""

    batch: object
    seq: object
    ep: tuple[str, ...]
    mlp: object
    ep_size: int

    @property
    def tokens(self) -> PartitionSpec:
        return PartitionSpec(self.batch, self.seq, None)


@dataclass(frozen=True)
class Exchange:
    """How one device computes its part: the EP group's axes and size, the expert width's
    axes (tensor parallel), the exchange buffers' factor, fp8 or not."""

    ep: tuple[str, ...] = ()
    ep_size: int = 1
    mlp: tuple[str, ...] = ()
    factor: float = 0.0
    fp8: bool = False


def _axes(entry: object) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)  # type: ignore[arg-type]


def layout(
    rules: Rules, sizes: dict[str, int], shape_BLD: tuple[int, ...], e: int, f: int
) -> Layout:
    """The layout on a mesh of `sizes` for tokens [B, L, D] and E experts of width F."""
    batch, seq, _ = logical_to_spec(("act_batch", "act_seq", None), rules, sizes, shape_BLD)
    token_axes = set(_axes(batch)) | set(_axes(seq))
    # Only axes that split the tokens can exchange them; over any other (rows too few to
    # split, e.g. one generated sequence) the experts are gathered and each device computes
    # all of them for its tokens. config.validate refuses rules that would always do so.
    ep = _axes(logical_to_spec(("experts",), rules, sizes, (e,))[0])
    ep = tuple(a for a in ep if a in token_axes)
    mlp = logical_to_spec(("mlp",), rules, sizes, (f,))[0]
    return Layout(batch, seq, ep, mlp, math.prod(sizes[a] for a in ep))


def grouped_swiglu(
    x_AD: jax.Array,
    expert_A: jax.Array,
    gate_up_EDFC: jax.Array,
    down_EFD: jax.Array,
    fp8: bool = False,
) -> jax.Array:
    """Rows [A, D] through the SwiGLU expert `expert_A` names (ids >= E: no expert, output 0),
    as two grouped matmuls over the rows sorted by expert (in fp8 if asked)."""
    e, d, f, _ = gate_up_EDFC.shape
    order_A = jnp.argsort(expert_A, stable=True)
    sizes_E = jnp.bincount(expert_A, length=e).astype(jnp.int32)  # ids >= E are not counted
    matmul = fp8_grouped_matmul if fp8 else grouped_matmul
    h_AFC = matmul(x_AD[order_A], gate_up_EDFC.reshape(e, d, f * 2), sizes_E)
    h_AFC = h_AFC.reshape(-1, f, 2)
    y_AD = matmul(jax.nn.silu(h_AFC[..., 0]) * h_AFC[..., 1], down_EFD, sizes_E)
    return jnp.zeros_like(y_AD).at[order_A].set(y_AD)  # back in row order


def grouped_matmul(
    x_AK: jax.Array,
    w_EKN: jax.Array,
    sizes_E: jax.Array,
    out_dtype: jnp.dtype | None = None,
    ragged: bool | None = None,
) -> jax.Array:
    """Rows sorted by group (`sizes_E` each) times their group's weight: XLA's `ragged_dot`
    (`ragged`; default: on TPU), else the tiled scan."""
    if trace_platform() == "tpu" if ragged is None else ragged:
        return _ragged_matmul(x_AK, w_EKN, sizes_E, out_dtype)
    return tiled_grouped_matmul(x_AK, w_EKN, sizes_E, out_dtype=out_dtype)


def _per_element(f: Any) -> Any:
    """`f` under `vmap` as one call per element of the mapped axis instead of its batching
    rule, which gives a ragged dot batch dimensions: XLA:TPU compiles none ("Failed to create
    RaggedConvSpec"). The pipeline's vmap over stages reaches the experts inside their
    `shard_map`, where each device holds one stage: one call, as without stages; a longer
    axis (DP-SGD's vmap over rows) is a `lax.map`, one traced call whatever its length."""
    g = jax.custom_batching.custom_vmap(f)

    @g.def_vmap
    def rule(axis_size: int, in_batched: list[bool], *args: jax.Array) -> tuple[jax.Array, bool]:
        def one(mapped: list[jax.Array]) -> jax.Array:
            each = iter(mapped)
            return g(*(next(each) if b else a for a, b in zip(args, in_batched, strict=True)))

        mapped = [a for a, b in zip(args, in_batched, strict=True) if b]
        if axis_size == 1:
            return one([a[0] for a in mapped])[None], True
        return jax.lax.map(one, mapped), True

    return g


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ragged_matmul(
    x_AK: jax.Array, w_EKN: jax.Array, sizes_E: jax.Array, out_dtype: Any
) -> jax.Array:
    """`ragged_dot`, its gradient ragged dots too, each one call per element under `vmap`
    (`_per_element`: the batching rules of ragged_dot's own derivatives would batch them)."""
    dot = partial(jax.lax.ragged_dot, preferred_element_type=out_dtype)
    return _per_element(dot)(x_AK, w_EKN, sizes_E)


def _ragged_forward(
    x_AK: jax.Array, w_EKN: jax.Array, sizes_E: jax.Array, out_dtype: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    return _ragged_matmul(x_AK, w_EKN, sizes_E, out_dtype), (x_AK, w_EKN, sizes_E)


def _ragged_backward(_: Any, saved: tuple, g_AN: jax.Array) -> tuple:
    x_AK, w_EKN, sizes_E = saved
    dx_AK = _ragged_matmul(g_AN, w_EKN.swapaxes(1, 2), sizes_E, x_AK.dtype)
    dw_EKN = grouped_weight_grad(x_AK, g_AN, sizes_E, ragged=True)
    return dx_AK, dw_EKN.astype(w_EKN.dtype), None


_ragged_matmul.defvjp(_ragged_forward, _ragged_backward)


def grouped_weight_grad(
    x_AK: jax.Array, g_AN: jax.Array, sizes_E: jax.Array, ragged: bool | None = None
) -> jax.Array:
    """[E, K, N] f32: each group's rows of x transposed times theirs of g (the weight
    gradient of `grouped_matmul`): `ragged_dot_general` over the ragged contracting dim
    (`ragged`; default: on TPU), else a tiled scan."""
    if trace_platform() == "tpu" if ragged is None else ragged:
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([0], [0]), ([], [])),
            lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[],
        )
        dot = partial(jax.lax.ragged_dot_general, ragged_dot_dimension_numbers=dims,
                      preferred_element_type=jnp.float32)  # fmt: skip
        return _per_element(dot)(x_AK, g_AN, sizes_E)
    return _tiled_weight_grad(x_AK, g_AN, sizes_E)


def _pieces(a: int, tile: int, sizes_E: jax.Array) -> tuple[int, jax.Array, jax.Array, jax.Array]:
    """(tiles, piece starts, piece stops, group ends): the row tiles and group ends cut the
    rows into at most tiles + E - 1 pieces, each inside one tile and one group."""
    num_tiles = -(-a // tile)
    ends_E = jnp.cumsum(sizes_E)
    # every piece starts at a tile start or a group end; sorted, each piece runs to the next
    starts_P = jnp.sort(jnp.concatenate([jnp.arange(num_tiles) * tile, ends_E]))
    stops_P = jnp.concatenate([starts_P[1:], jnp.full((1,), num_tiles * tile)])
    return num_tiles, starts_P, stops_P, ends_E


def _piece_rows(
    start: jax.Array, stop: jax.Array, tile: int, num_tiles: int, ends_E: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tile, group, rows of the tile inside the piece [R]) of the piece [start, stop)."""
    t = jnp.minimum(start // tile, num_tiles - 1)
    g = jnp.searchsorted(ends_E, start, side="right")  # the group holding row `start`
    index_R = t * tile + jnp.arange(tile)
    return t, g, (index_R >= start) & (index_R < stop) & (g < ends_E.shape[0])


def _tiles(x_AK: jax.Array, tile: int) -> jax.Array:
    return jnp.pad(x_AK, ((0, -x_AK.shape[0] % tile), (0, 0))).reshape(-1, tile, x_AK.shape[1])


def _tiled_weight_grad(
    x_AK: jax.Array, g_AN: jax.Array, sizes_E: jax.Array, tile: int | None = None
) -> jax.Array:
    """`grouped_weight_grad` as a scan over (row tile, group) pieces: one [K, N] product a
    piece, added to its group's gradient."""
    a, k = x_AK.shape
    e, n = sizes_E.shape[0], g_AN.shape[1]
    tile = min(tile or scan_tile(), a)
    num_tiles, starts_P, stops_P, ends_E = _pieces(a, tile, sizes_E)
    x_TRK, g_TRN = _tiles(x_AK, tile), _tiles(g_AN, tile)

    def piece(dw_EKN: jax.Array, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        t, g, inside_R = _piece_rows(*bounds, tile, num_tiles, ends_E)
        x_RK = jnp.where(inside_R[:, None], x_TRK[t], jnp.zeros((), x_TRK.dtype))
        dw_KN = jnp.einsum("rk,rn->kn", x_RK, g_TRN[t], preferred_element_type=jnp.float32)
        return dw_EKN.at[jnp.minimum(g, e - 1)].add(jnp.where(g < e, dw_KN, 0.0)), None

    dw_EKN, _ = jax.lax.scan(piece, jnp.zeros((e, k, n), jnp.float32), (starts_P, stops_P))
    return dw_EKN


@jax.custom_vjp
def fp8_grouped_matmul(x_AK: jax.Array, w_EKN: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """`grouped_matmul` in fp8 (bigjax/fp8.py's recipe: e4m3 operands forward, e5m2
    gradients, one scale a tensor, f32 accumulation), in x's dtype."""
    return _fp8_grouped_forward(x_AK, w_EKN, sizes_E)[0]


def _fp8_grouped_forward(
    x_AK: jax.Array, w_EKN: jax.Array, sizes_E: jax.Array
) -> tuple[jax.Array, tuple]:
    xq, x_factor = fp8_ops.quantize(x_AK, fp8_ops.E4M3)
    wq, w_factor = fp8_ops.quantize(w_EKN, fp8_ops.E4M3)
    y_AN = grouped_matmul(xq, wq, sizes_E, jnp.float32) * (x_factor * w_factor)
    saved = (xq, x_factor, wq, w_factor, sizes_E, jnp.zeros((0,), w_EKN.dtype))
    return y_AN.astype(x_AK.dtype), saved


def _fp8_grouped_backward(saved: tuple, g_AN: jax.Array) -> tuple:
    xq, x_factor, wq, w_factor, sizes_E, w_dtype = saved
    gq, g_factor = fp8_ops.quantize(g_AN, fp8_ops.E5M2)
    dx_AK = grouped_matmul(gq, wq.swapaxes(1, 2), sizes_E, jnp.float32) * (g_factor * w_factor)
    dw_EKN = grouped_weight_grad(xq, gq, sizes_E) * (x_factor * g_factor)
    return dx_AK.astype(g_AN.dtype), dw_EKN.astype(w_dtype.dtype), None


fp8_grouped_matmul.defvjp(_fp8_grouped_forward, _fp8_grouped_backward)


def scan_tile() -> int:
    """Rows per tile of the tiled scans on the platform being traced. A GPU runs each piece's
    product as its own small kernel, so the scan is bound by the number of pieces (tiles + E):
    on an H200, a Qwen3-30B-A3B layer's grouped product ran at 18.5 / 30 / 41.7 / 46.7
    TFLOP/s with tiles of 128 / 256 / 512 / 1024 rows (docs/benchmarks.md). A CPU, where
    each piece's work dominates and the padding of larger tiles is paid in full, keeps 128."""
    return 1024 if trace_platform() == "gpu" else 128


def tiled_grouped_matmul(
    x_AK: jax.Array,
    w_EKN: jax.Array,
    sizes_E: jax.Array,
    tile: int | None = None,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """`ragged_dot` (rows sorted by group, `sizes_E` rows each; rows past them get 0) as a
    scan over (row tile, group) pieces, megablox's schedule in plain JAX.

    XLA:CPU (and, by its decomposition, any backend without a native ragged dot) turns
    `ragged_dot` into a dense product masked per group, [E, A, K] in memory: 7.7 GiB for one
    64-expert layer of 4096 tokens (docs/scaling.md). The row tiles and group ends cut the
    rows into at most tiles + E - 1 pieces, each inside one tile and one group; the scan
    multiplies each piece's tile by its group's weight, so memory is one tile's product and
    the work (tiles + E) x tile rows, not E x A."""
    x_AK, w_EKN = jnp.asarray(x_AK), jnp.asarray(w_EKN)
    a = x_AK.shape[0]
    e, _, n = w_EKN.shape
    out_dtype = out_dtype or jnp.result_type(x_AK, w_EKN)
    tile = min(tile or scan_tile(), a)
    num_tiles, starts_P, stops_P, ends_E = _pieces(a, tile, sizes_E)
    x_TRK = _tiles(x_AK, tile)

    def piece(out_TRN: jax.Array, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        t, g, inside_R = _piece_rows(*bounds, tile, num_tiles, ends_E)
        w_KN = w_EKN[jnp.minimum(g, e - 1)]
        y_RN = jnp.einsum("rk,kn->rn", x_TRK[t], w_KN, preferred_element_type=out_dtype)
        return out_TRN.at[t].add(jnp.where(inside_R[:, None], y_RN, 0)), None

    out_TRN = jnp.zeros((num_tiles, tile, n), out_dtype)
    out_TRN, _ = jax.lax.scan(piece, out_TRN, (starts_P, stops_P))
    return out_TRN.reshape(-1, n)[:a]


def dropless(
    x_BLD: jax.Array,
    expert_BLK: jax.Array,
    weight_BLK: jax.Array,
    gate_up_EDFC: jax.Array,
    down_EFD: jax.Array,
    *,
    rules: Rules,
    exchange_factor: float = 0.0,
    fp8: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """sum_k weight * expert_k(x) per token: (out [B, L, D], assignments dropped at the
    exchange: 0 unless `exchange_factor` bounds it). Runs under `shard_map` on a mesh. In
    fp8 each device scales what it multiplies (its rows, its experts) by their own maximum."""
    mesh = jax.sharding.get_abstract_mesh()
    x_BLD, expert_BLK, weight_BLK = map(jnp.asarray, (x_BLD, expert_BLK, weight_BLK))
    e, _, f, _ = gate_up_EDFC.shape
    if mesh.empty:
        how = Exchange(factor=exchange_factor, fp8=fp8)
        return _local(x_BLD, expert_BLK, weight_BLK, gate_up_EDFC, down_EFD, how)
    lay = layout(rules, dict(mesh.shape), x_BLD.shape, e, f)
    how = Exchange(lay.ep, lay.ep_size, _axes(lay.mlp), exchange_factor, fp8)
    ep_spec = None if not lay.ep else lay.ep[0] if len(lay.ep) == 1 else lay.ep
    token_axes = _axes(lay.batch) + _axes(lay.seq)

    def local(
        x_BLD: jax.Array,
        expert_BLK: jax.Array,
        weight_BLK: jax.Array,
        gate_up_EDFC: jax.Array,
        down_EFD: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        out_BLD, dropped = _local(x_BLD, expert_BLK, weight_BLK, gate_up_EDFC, down_EFD, how)
        return out_BLD, jax.lax.psum(dropped, token_axes) if token_axes else dropped

    return jax.shard_map(
        local,
        in_specs=(
            lay.tokens,
            lay.tokens,
            lay.tokens,
            PartitionSpec(ep_spec, None, lay.mlp, None),
            PartitionSpec(ep_spec, lay.mlp, None),
        ),
        out_specs=(lay.tokens, PartitionSpec()),
        check_vma=False,
    )(x_BLD, expert_BLK, weight_BLK, gate_up_EDFC, down_EFD)


def _local(
    x_BLD: jax.Array,
    expert_BLK: jax.Array,
    weight_BLK: jax.Array,
    gate_up_EDFC: jax.Array,
    down_EFD: jax.Array,
    how: Exchange,
) -> tuple[jax.Array, jax.Array]:
    """One device's tokens through the experts (its local ones, after the exchange)."""
    b, length, d = x_BLD.shape
    k = expert_BLK.shape[-1]
    x_TD = x_BLD.reshape(b * length, d)
    expert_A = expert_BLK.reshape(-1)  # assignment a = token a // k, its (a % k)-th choice
    token_A = jnp.arange(expert_A.shape[0]) // k
    if how.ep_size == 1:
        y_AD = grouped_swiglu(x_TD[token_A], expert_A, gate_up_EDFC, down_EFD, how.fp8)
        dropped = jnp.zeros((), jnp.float32)
    else:
        y_AD, dropped = _exchanged(x_TD[token_A], expert_A, gate_up_EDFC, down_EFD, how)
    if how.mlp:  # the down projection's partial sums over the expert width's shards
        y_AD = jax.lax.psum(y_AD, how.mlp)
    y_TKD = y_AD.reshape(b * length, k, d)
    out_TD = jnp.einsum("tkd,tk->td", y_TKD, weight_BLK.reshape(-1, k).astype(y_TKD.dtype))
    return out_TD.reshape(b, length, d), dropped


def exchange_slots(assignments: int, ep_size: int, exchange_factor: float) -> int:
    """Rows per destination in the all-to-all buffers: every assignment (dropless) unless
    `exchange_factor` sizes it as a multiple of the balanced share."""
    if exchange_factor <= 0 or exchange_factor >= ep_size:
        return assignments
    return max(1, math.ceil(exchange_factor * assignments / ep_size))


def _exchanged(
    x_AD: jax.Array,
    expert_A: jax.Array,
    gate_up_EDFC: jax.Array,
    down_EFD: jax.Array,
    how: Exchange,
) -> tuple[jax.Array, jax.Array]:
    """Assignments to the devices of their experts and the results back (all-to-all)."""
    ep, ep_size = how.ep, how.ep_size
    a, d = x_AD.shape
    local_e = gate_up_EDFC.shape[0]  # experts on this device: E / EP
    slots = exchange_slots(a, ep_size, how.factor)
    dest_A = expert_A // local_e
    # Each assignment's slot in its destination's buffer: its rank among those going there.
    order_A = jnp.argsort(dest_A, stable=True)
    counts_P = jnp.bincount(dest_A, length=ep_size)
    starts_P = jnp.cumsum(counts_P) - counts_P
    slot_A = jnp.zeros_like(dest_A).at[order_A].set(jnp.arange(a) - starts_P[dest_A[order_A]])
    kept_A = slot_A < slots
    # Dropped assignments go to an out-of-range row, which the scatter drops.
    row_A = jnp.where(kept_A, dest_A * slots + slot_A, ep_size * slots)
    send_RD = jnp.zeros((ep_size * slots, d), x_AD.dtype).at[row_A].set(x_AD, mode="drop")
    no_expert = local_e  # id of an empty slot: the grouped matmul leaves its row 0
    send_R = jnp.full((ep_size * slots,), no_expert, expert_A.dtype)
    send_R = send_R.at[row_A].set(expert_A % local_e, mode="drop")

    def swap(x: jax.Array) -> jax.Array:  # [EP * slots, ...]: block p to device p
        blocks = x.reshape(ep_size, slots, *x.shape[1:])
        return jax.lax.all_to_all(blocks, ep, 0, 0, tiled=True).reshape(x.shape)

    y_RD = grouped_swiglu(swap(send_RD), swap(send_R), gate_up_EDFC, down_EFD, how.fp8)
    back_RD = swap(y_RD)
    y_AD = jnp.where(kept_A[:, None], back_RD[jnp.minimum(row_A, ep_size * slots - 1)], 0)
    return y_AD, jnp.sum(~kept_A).astype(jnp.float32)


def exchange_plan(
    rules: Rules,
    sizes: dict[str, int],
    tokens_BL: tuple[int, int],
    num_experts: int,
    top_k: int,
    d_model: int,
    dtype_bytes: int,
    exchange_factor: float,
) -> dict[str, Any]:
    """Experts per device and the all-to-all of one dropless MoE layer for a micro-batch of
    `tokens_BL` (rows, length) on a mesh of `sizes`: what `plan` reports."""
    lay = layout(rules, sizes, (*tokens_BL, d_model), num_experts, 1)
    token_devices = math.prod(sizes[a] for a in _axes(lay.batch) + _axes(lay.seq))
    ep = lay.ep_size
    assignments = tokens_BL[0] * tokens_BL[1] // token_devices * top_k
    slots = exchange_slots(assignments, ep, exchange_factor) if ep > 1 else 0
    buffer = ep * slots * d_model * dtype_bytes  # one direction's send (= receive) buffer
    return {
        "experts_per_device": num_experts // ep,
        "num_experts": num_experts,
        "ep": ep,
        "ep_axes": " x ".join(f"{a} {sizes[a]}" for a in lay.ep),
        "assignments_per_device": assignments,
        "buffer_bytes": buffer,
        # dispatch and combine, each sending all but the own block; backward the same again
        "all_to_all_bytes_per_layer": 2 * buffer * (ep - 1) / ep,
    }


def describe(p: dict[str, Any]) -> str:
    """One line of `exchange_plan` for `plan`'s report."""
    mib = 2**20
    if p["ep"] == 1:
        return f"{p['num_experts']} experts on every device (no expert parallelism)"
    return (
        f"{p['experts_per_device']} of {p['num_experts']} experts per device (EP {p['ep']}: "
        f"{p['ep_axes']}); "
        f"all-to-all {p['all_to_all_bytes_per_layer'] / mib:,.0f} MiB per layer forward "
        f"(as much backward), buffers {p['buffer_bytes'] / mib:,.0f} MiB"
    )
