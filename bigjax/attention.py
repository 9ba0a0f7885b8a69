"""Softmax attention over packed documents, one function per kernel, chosen by `model.attention`.

Every kernel takes q [B, L, H, K], k and v [B, S, G, K] (grouped queries: query head
h = g * R + r uses KV head g) and the rows' segment ids [B, L] (one id per packed document,
0 on padding), and returns [B, L, H, K]. Attention never crosses a document, and decoders
attend only to earlier positions:

  einsum  bigjax's own two einsums under a dense [B, 1, L, S] mask (any backend; the CPU choice)
  xla     `jax.nn.dot_product_attention`'s XLA path, same mask
  cudnn   cuDNN's fused flash attention (NVIDIA GPUs): causal masking inside the kernel and the
          documents as cuDNN's packed sequences (offsets and lengths), so no mask is built
          (under context parallelism the shard's mask, as a bias: `context_inner`)
  splash  the Pallas splash kernel that ships with jax (TPUs): causal mask and segment ids
          inside the kernel, block-sparse; runs in Pallas' interpreter on other backends
  auto    the fastest that applies to the devices the model runs on (`resolve`)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bigjax import context
from bigjax.config import ATTENTION_IMPLS as IMPLS
from bigjax.errors import BigjaxWarning
from bigjax.sharding import (
    CONTEXT_AXIS,
    Rules,
    attention_specs,
    context_parts,
    mesh_sizes,
    trace_platform,
)

# cuDNN's packed layout takes a fixed number of documents per row; a row with more is refused
# before it reaches the device (`check_segments`), never attended wrongly. 64 covers rows of
# 2048 tokens whose documents average 32 tokens.
CUDNN_MAX_SEGMENTS = 64
# But the bound costs time: cuDNN's backward pre-pass (dO . O per query) launches one block
# row per row and slot, so at 64 slots it took 1.27 ms a layer against 0.07 ms for one
# document per row (H200, 8 x 2048, 32 heads: 20 of bigjax's 267 ms step). The kernel is
# compiled for each bound here and a batch takes the smallest its rows fit (`lax.switch`).
CUDNN_SEGMENT_BOUNDS = (8, CUDNN_MAX_SEGMENTS)
# Splash tiles: 512 is what its authors tune for on v5e/v5p; smaller rows use one tile.
SPLASH_BLOCK = 512


def resolve(impl: str, platform: str, *, dtype: np.dtype, head_dim: int, seq_len: int) -> str:
    """The kernel `auto` means on `platform` ('cpu', 'gpu', 'tpu') for this model; other
    choices are returned unchanged. Falls back to `einsum` where the kernel cannot run:
    cuDNN needs 16-bit inputs and a head dim that is a multiple of 8 up to 256; splash tiles
    the sequence in multiples of 128."""
    if impl != "auto":
        return impl
    if (
        platform == "gpu"
        and np.dtype(dtype).itemsize == 2
        and head_dim % 8 == 0
        and head_dim <= 256
    ):
        return "cudnn"
    if platform == "tpu" and seq_len % 128 == 0:
        return "splash"
    return "einsum"


def attention_mask(segment_ids_BL: jax.Array, causal: bool = True) -> jax.Array:
    """[B, 1, L, S] bool: attention within a packed document only, and (decoders) only to
    earlier positions. Encoders (causal=False) also keep padding (segment 0) to itself."""
    length = segment_ids_BL.shape[1]
    same_doc_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    if not causal:
        return same_doc_BLS[:, None]
    causal_LS = jnp.tril(jnp.ones((length, length), dtype=bool))
    return (causal_LS & same_doc_BLS)[:, None]


def attention_probs(q_BLHK: jax.Array, k_BSGK: jax.Array, mask_B1LS: jax.Array) -> jax.Array:
    """The attention weights [B, G, R, L, S] in float32 (query head h = g * R + r); also what
    `bigjax inspect` draws, so its maps are the model's own."""
    b, length, h, k = q_BLHK.shape
    g = k_BSGK.shape[2]
    q_BLGRK = (q_BLHK * (1.0 / math.sqrt(k))).reshape(b, length, g, h // g, k)
    scores_BGRLS = jnp.einsum(
        "blgrk,bsgk->bgrls", q_BLGRK, k_BSGK, preferred_element_type=jnp.float32
    )
    masked = jnp.where(mask_B1LS[:, :, None], scores_BGRLS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(masked, axis=-1)


def dot_product_attention(
    q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, mask_B1LS: jax.Array
) -> jax.Array:
    """Softmax attention for grouped queries, as two einsums over [B, L, G, R, K] (K/V never
    repeated). Scores and softmax run in float32 whatever the compute dtype. On CPU this runs
    the benchmark step 2-3 % faster than `jax.nn.dot_product_attention`'s XLA path (whose
    reshapes and transposes XLA:CPU does not fold away, docs/benchmarks.md)."""
    b, length, h, k = q_BLHK.shape
    probs_BGRLS = attention_probs(q_BLHK, k_BSGK, mask_B1LS).astype(v_BSGK.dtype)
    out_BLGRK = jnp.einsum("bgrls,bsgk->blgrk", probs_BGRLS, v_BSGK)
    return out_BLGRK.reshape(b, length, h, k)


def attend(
    impl: str,
    q_BLHK: jax.Array,
    k_BLGK: jax.Array,
    v_BLGK: jax.Array,
    segment_ids_BL: jax.Array,
    *,
    causal: bool,
    rules: Rules,
) -> jax.Array:
    """Self-attention of a packed batch with the kernel `impl`; 'auto' is resolved here, at
    trace time, for the devices and shapes being traced."""
    num_parts = context_parts(rules, mesh_sizes(), q_BLHK.shape[1])
    chosen = resolve(
        impl,
        trace_platform(),
        dtype=q_BLHK.dtype,
        head_dim=q_BLHK.shape[-1],
        seq_len=q_BLHK.shape[1] // num_parts,  # what one device's kernel tiles
    )

    def run(impl: str) -> jax.Array:
        if num_parts > 1:  # the sequence is split over the context axis (bigjax/context.py)
            if impl == "splash":
                return splash_context_attention(
                    q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal, rules
                )  # fmt: skip
            # elsewhere `context_inner`'s kernel on each device's shard
            inner = functools.partial(context_inner, impl, causal=causal)
            return context.attend(inner, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL,
                                  causal=causal, rules=rules)  # fmt: skip
        if impl in ("einsum", "xla"):
            mask_B1LS = attention_mask(segment_ids_BL, causal)
            if impl == "einsum":
                return dot_product_attention(q_BLHK, k_BLGK, v_BLGK, mask_B1LS)
            return jax.nn.dot_product_attention(
                q_BLHK, k_BLGK, v_BLGK, mask=mask_B1LS, implementation="xla"
            )
        kernel = {"cudnn": cudnn_attention, "splash": splash_attention}.get(impl)
        if kernel is None:
            raise ValueError(f"attention kernel {impl!r}: expected one of {IMPLS[1:]}")
        return kernel(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal=causal, rules=rules)

    if impl == "auto" and chosen == "cudnn":
        # jax checks the GPU, cuDNN version and shapes while tracing; where the kernel is
        # unavailable (pre-Hopper GPUs, an old cuDNN) `auto` must still train.
        try:
            return run("cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as e:
            warnings.warn(
                f"model.attention=auto: cuDNN flash attention is unavailable here "
                f"({type(e).__name__}: {str(e).strip()[:200]}); using the einsum path.",
                category=BigjaxWarning,
                stacklevel=2,
            )
            chosen = "einsum"
    return run(chosen)


def context_inner(impl: str, shard: context.Shard, *, causal: bool) -> jax.Array:
    """One device's attention under context parallelism: its queries against its rows' whole
    keys, under the shard's mask (documents and places in the row). With 'cudnn' the mask
    goes to cuDNN's flash kernel through jax's public API, as a [B, 1, Q, L] additive bias
    read tile by tile: the packed-sequence form cannot say that a shard's queries start
    inside a document (its causal masks align each document's first query with its first
    key), so the kernel computes the whole Q x L rectangle, masked tiles too, but never
    stores scores or probabilities. Other kernels: two einsums under the mask."""
    mask_B1QL = context.mask(shard, causal)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            shard.q_BQHK, shard.k_BLGK, shard.v_BLGK, mask=mask_B1QL, implementation="cudnn"
        )
    return dot_product_attention(shard.q_BQHK, shard.k_BLGK, shard.v_BLGK, mask_B1QL)


# --- cuDNN ---------------------------------------------------------------------------------


def packed_segments(segment_ids_BL: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's description of packed rows: (lengths [B, M], offsets [B, M + 1]) of each row's
    runs of equal segment ids (a padding run is a segment of its own, so every position is
    covered), -1 past the row's last run. The offsets are starts only, no end entry: jax
    concatenates every row's non-negative offsets into one list aligned with the lengths, so
    an end entry would shift each later row's segments by one (measured on an H200: NaN).
    Rows with more than M runs must be refused before (`check_segments`): their extra runs
    would be dropped."""
    b, length = segment_ids_BL.shape
    pos_L = jnp.arange(length, dtype=jnp.int32)
    starts_BL = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1
    )
    # Run starts in order, then `length` for every slot past the last run.
    starts_BM1 = jnp.sort(jnp.where(starts_BL, pos_L, length), axis=1)[:, : max_segments + 1]
    if starts_BM1.shape[1] < max_segments + 1:
        pad = max_segments + 1 - starts_BM1.shape[1]
        starts_BM1 = jnp.pad(starts_BM1, ((0, 0), (0, pad)), constant_values=length)
    runs_B = jnp.sum(starts_BL, axis=1)
    slot_M1 = jnp.arange(max_segments + 1, dtype=jnp.int32)
    lengths_BM = starts_BM1[:, 1:] - starts_BM1[:, :-1]
    lengths_BM = jnp.where(slot_M1[:-1] < runs_B[:, None], lengths_BM, -1)
    offsets_BM1 = jnp.where(slot_M1 < runs_B[:, None], starts_BM1, -1)
    return lengths_BM.astype(jnp.int32), offsets_BM1.astype(jnp.int32)


def segment_runs(segment_ids_BL: np.ndarray) -> np.ndarray:
    """Runs of equal segment ids in each row [B] (host side, numpy)."""
    changes = np.count_nonzero(segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1], axis=1)
    return changes + 1


def check_segments(segment_ids_BL: np.ndarray, max_segments: int) -> None:
    """Refuses a batch that the cuDNN packed kernel would attend wrongly (host side)."""
    runs = segment_runs(segment_ids_BL)
    worst = int(runs.max(initial=0))
    if worst > max_segments:
        raise ValueError(
            f"a packed row holds {worst} documents (padding counted), more than the "
            f"{max_segments} the cuDNN attention kernel takes per row; use longer documents, "
            f"a shorter data.seq_len, data.packing=pad, or model.attention=einsum"
        )


# jax's cuDNN kernel takes packed sequences (offsets and lengths) only in jax._src: the public
# `jax.nn.dot_product_attention` takes documents as a dense mask. The private module is used
# only on the jax versions it is known on (the newest pinned here, and the first with it);
# elsewhere `auto` falls back to the XLA path with a warning (`attend`).
CUDNN_JAX = ((0, 7), (0, 11))  # first and last minor versions, inclusive


def packed_cudnn_kernel(version: str) -> ModuleType | None:
    """jax's `fused_attention_stablehlo` module on a jax it is known on, else None."""
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    if not CUDNN_JAX[0] <= major_minor <= CUDNN_JAX[1]:
        return None
    try:
        from jax._src.cudnn import fused_attention_stablehlo
    except ImportError:  # moved or renamed in a release between the two
        return None
    return fused_attention_stablehlo


def cudnn_attention(
    q_BLHK: jax.Array,
    k_BLGK: jax.Array,
    v_BLGK: jax.Array,
    segment_ids_BL: jax.Array,
    *,
    causal: bool,
    rules: Rules,
) -> jax.Array:
    """cuDNN flash attention with the documents of each row as packed sequences (Hopper and
    newer). jax's public `dot_product_attention` takes segments only as a dense mask (a bias
    the kernel reads tile by tile); the packed form keeps masking inside the kernel."""
    cudnn = packed_cudnn_kernel(jax.__version__)
    if cudnn is None:
        raise NotImplementedError(
            f"attention='cudnn' needs jax's packed-sequence cuDNN kernel, known on jax "
            f"{'.'.join(map(str, CUDNN_JAX[0]))} to {'.'.join(map(str, CUDNN_JAX[1]))}.x; this is "
            f"jax {jax.__version__}: use attention='xla' or 'auto'"
        )
    mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    scale = 1.0 / math.sqrt(q_BLHK.shape[-1])

    def bounded(max_segments: int) -> Kernel:
        def kernel(
            q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_ids_BL: jax.Array
        ) -> jax.Array:
            lengths_BM, offsets_BM1 = packed_segments(segment_ids_BL, max_segments)
            # self-attention: queries and keys are packed alike
            packed = {"q_seqlen": lengths_BM, "kv_seqlen": lengths_BM}
            packed |= {"q_offsets": offsets_BM1, "kv_offsets": offsets_BM1}
            return cudnn.dot_product_attention(
                q_BLHK, k_BLGK, v_BLGK, **packed, scale=scale, mask_type=mask_type
            )

        return kernel

    def local(
        q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_ids_BL: jax.Array
    ) -> jax.Array:
        bound = segment_bound(segment_ids_BL, CUDNN_SEGMENT_BOUNDS)
        kernels = [bounded(m) for m in CUDNN_SEGMENT_BOUNDS]
        return jax.lax.switch(bound, kernels, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)

    return _per_shard(local, rules, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)


def segment_bound(segment_ids_BL: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
    """Index of the smallest of `bounds` (ascending) that every row's runs of equal segment
    ids fit (the last where none does: such rows are refused on the host before)."""
    runs_B = 1 + jnp.sum(segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1], axis=1)
    worst = jnp.max(runs_B)
    return jnp.minimum(jnp.sum(worst > jnp.asarray(bounds)), len(bounds) - 1)


# --- splash (TPU) --------------------------------------------------------------------------


def splash_attention(
    q_BLHK: jax.Array,
    k_BLGK: jax.Array,
    v_BLGK: jax.Array,
    segment_ids_BL: jax.Array,
    *,
    causal: bool,
    rules: Rules,
) -> jax.Array:
    """The Pallas splash kernel, one multi-query call per KV head and row, under `shard_map`
    over the batch and head shards (a Pallas call is opaque to XLA's sharding propagation,
    which would otherwise gather the whole batch onto every device)."""
    b, length, h, k = q_BLHK.shape
    g = k_BLGK.shape[2]
    # Pallas' interpreter runs the same kernel on CPU/GPU (slowly): for tests, not for speed.
    kernel = _splash_kernel(length, h // g, causal, interpret=trace_platform() != "tpu")
    scale = 1.0 / math.sqrt(k)

    def local(
        q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_ids_BL: jax.Array
    ) -> jax.Array:
        return _splash_rows(kernel, scale, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, segment_ids_BL)

    return _per_shard(local, rules, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)


def _splash_rows(
    kernel: Any,
    scale: float,
    q_BQHK: jax.Array,
    k_BLGK: jax.Array,
    v_BLGK: jax.Array,
    q_ids_BQ: jax.Array,
    kv_ids_BL: jax.Array,
) -> jax.Array:
    """A multi-query splash `kernel` on every row and KV head of one device's arrays."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

    b, q_len, h, k = q_BQHK.shape
    g = k_BLGK.shape[2]
    q_BGRQK = (q_BQHK * scale).reshape(b, q_len, g, h // g, k).transpose(0, 2, 3, 1, 4)
    k_BGLK, v_BGLK = k_BLGK.transpose(0, 2, 1, 3), v_BLGK.transpose(0, 2, 1, 3)

    def one(
        q_RQK: jax.Array, k_LK: jax.Array, v_LK: jax.Array, q_ids_Q: jax.Array, kv_ids_L: jax.Array
    ) -> jax.Array:
        return kernel(q_RQK, k_LK, v_LK, splash_attention_kernel.SegmentIds(q=q_ids_Q, kv=kv_ids_L))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out_BGRQK = jax.vmap(per_head)(q_BGRQK, k_BGLK, v_BGLK, q_ids_BQ, kv_ids_BL)
    return out_BGRQK.transpose(0, 3, 1, 2, 4).reshape(b, q_len, h, k)


def splash_context_attention(
    q_BLHK: jax.Array,
    k_BLGK: jax.Array,
    v_BLGK: jax.Array,
    segment_ids_BL: jax.Array,
    causal: bool,
    rules: Rules,
) -> jax.Array:
    """Splash over a context-sharded batch: one kernel whose mask is the whole [L, L] one
    with the queries in load-balanced order, split by query shard (splash's q_seq_shards:
    each device holds the block-sparsity of its own queries, and fully masked blocks of the
    gathered keys are skipped)."""
    b, length, h, k = q_BLHK.shape
    g = k_BLGK.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    num_parts = dict(mesh.shape)[CONTEXT_AXIS]
    kernel = _splash_kernel(
        length,
        h // g,
        causal,
        interpret=trace_platform() != "tpu",
        num_parts=num_parts,
    )
    scale = 1.0 / math.sqrt(k)

    def inner(shard: context.Shard, *sharded: Any) -> jax.Array:
        return _splash_rows(
            sharded[0] if sharded else kernel, scale, shard.q_BQHK, shard.k_BLGK, shard.v_BLGK,
            shard.q_ids_BQ, shard.kv_ids_BL,
        )  # fmt: skip

    if not causal:  # one mask for every shard (`_splash_kernel`)
        return context.attend(
            inner, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal=causal, rules=rules
        )
    spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, CONTEXT_AXIS)))
    return context.attend(
        inner, q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, causal=causal, rules=rules,
        extra=(kernel,), extra_specs=(spec,),
    )  # fmt: skip


Kernel = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]  # q, k, v, ids


def _per_shard(
    local: Kernel,
    rules: Rules,
    q_BLHK: jax.Array,
    k_BLGK: jax.Array,
    v_BLGK: jax.Array,
    segment_ids_BL: jax.Array,
) -> jax.Array:
    """`local` (a kernel XLA cannot partition: a Pallas or cuDNN custom call) on each device's
    rows and heads under `shard_map`; XLA's propagation would otherwise gather the whole batch
    onto every device. Outside a mesh, `local` on everything."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)
    batch, heads, kv_heads = attention_specs(
        rules, dict(mesh.shape), q_BLHK.shape[0], q_BLHK.shape[2], k_BLGK.shape[2]
    )
    q_spec = PartitionSpec(batch, None, heads, None)
    kv_spec = PartitionSpec(batch, None, kv_heads, None)
    return jax.shard_map(
        local,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(batch, None)),
        out_specs=q_spec,
        check_vma=False,
    )(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)


def _splash_kernel(
    length: int, group: int, causal: bool, interpret: bool, num_parts: int = 1
) -> Any:
    """A multi-query splash kernel for `group` query heads per KV head; with `num_parts` > 1
    (context parallelism) the queries are in load-balanced order and its mask is split into
    that many query shards."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    # One block size for every tile of the forward and both backward kernels (each of
    # BlockSizes' `block_*` fields): the shard's length is a multiple of it.
    block = math.gcd(length // num_parts, SPLASH_BLOCK)
    tiles = [f.name for f in dataclasses.fields(sk.BlockSizes) if f.name.startswith("block_")]
    blocks: dict[str, Any] = dict.fromkeys(tiles, block)
    sizes = sk.BlockSizes(**blocks)
    if not causal:  # every shard's queries see the whole row: one mask for all
        mask = sm.MultiHeadMask([sm.FullMask((length // num_parts, length))] * group)
        return sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)
    one = sm.CausalMask((length, length))
    if num_parts == 1:
        mask = sm.MultiHeadMask([one] * group)
        return sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)
    # A query's place in the row, not its index in the balanced row, decides what it sees.
    one.q_sequence = context.chunk_order(length, num_parts).astype(np.int32)
    return sk.make_splash_mqa(
        mask=sm.MultiHeadMask([one] * group),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=num_parts,
        interpret=interpret,
    )
