"""Attention kernels: splash (Pallas interpreter on CPU) and cuDNN's packed-document
description against the einsum path; what `auto` picks on each platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from helpers import corpus_batches, run_steps

from bigjax import attention
from bigjax.config import DEFAULT_RULES, MeshConfig
from bigjax.mesh import make_mesh

B, L, K = 8, 128, 16


def _qkv(heads: int, kv_heads: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (B, L, heads, K), dtype)
    k = jax.random.normal(keys[1], (B, L, kv_heads, K), dtype)
    v = jax.random.normal(keys[2], (B, L, kv_heads, K), dtype)
    return q, k, v


def _segments() -> jnp.ndarray:
    """Packed rows as the pipeline makes them: several documents, padding at the end, one
    row of a single document, one of documents one token long."""
    seg = np.ones((B, L), np.int32)
    seg[0, 40:], seg[0, 90:], seg[0, 120:] = 2, 3, 0
    seg[1, 1:], seg[1, 2:] = 2, 3
    seg[3, 64:] = 0
    seg[4] = np.repeat(np.arange(1, 9), L // 8)
    seg[5, :7] = np.arange(1, 8)
    seg[5, 7:] = 8
    return jnp.asarray(seg)


def _attend(impl, q, k, v, seg, causal):
    return attention.attend(impl, q, k, v, seg, causal=causal, rules=DEFAULT_RULES)


def _grads(impl, q, k, v, seg, causal):
    def loss(q, k, v):
        return jnp.sum(jnp.sin(_attend(impl, q, k, v, seg, causal).astype(jnp.float32)))

    return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heads", "kv_heads", "causal", "mesh_shape"),
    [
        (4, 2, True, None),
        (4, 4, False, None),
        (4, 1, True, (1, 8, 1)),
        (4, 2, True, (2, 2, 2)),
        (8, 4, False, (1, 2, 4)),
    ],
)
def test_splash_equals_einsum(heads, kv_heads, causal, mesh_shape):
    # The splash kernel in Pallas' interpreter, under shard_map on the mesh, against the dense
    # einsum path on one device. f32: both are exact softmax attention, differing only in the
    # order of the sums (online softmax over 128-wide tiles), so ~1e-6 relative.
    q, k, v = _qkv(heads, kv_heads)
    seg = _segments()
    ref = _attend("einsum", q, k, v, seg, causal)
    ref_g = _grads("einsum", q, k, v, seg, causal)
    if mesh_shape is None:
        out = jax.jit(_attend, static_argnums=(0, 5))("splash", q, k, v, seg, causal)
        out_g = _grads("splash", q, k, v, seg, causal)
    else:
        with jax.set_mesh(make_mesh(MeshConfig(shape=mesh_shape))):
            out = jax.jit(_attend, static_argnums=(0, 5))("splash", q, k, v, seg, causal)
            out_g = _grads("splash", q, k, v, seg, causal)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_splash_bf16_within_tolerance():
    # bf16 inputs: both paths accumulate in f32 but round the probabilities (einsum) or the
    # partial outputs (splash) to bf16 at different points; bf16 has 8 mantissa bits, so
    # outputs of magnitude <= ~1 agree to a few bf16 ulps (2^-8 ~ 0.004 each): 0.02 bounds it.
    q, k, v = _qkv(4, 2, jnp.bfloat16)
    seg = _segments()
    out = _attend("splash", q, k, v, seg, True).astype(jnp.float32)
    ref = _attend("einsum", q, k, v, seg, True).astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=2e-2)
    pairs = zip(
        _grads("splash", q, k, v, seg, True), _grads("einsum", q, k, v, seg, True), strict=True
    )
    for a, b in pairs:
        # gradients sum L terms of such errors: relative to their scale, 5 %
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=0.05 * scale)


def _mask_from_cudnn_segments(lengths, offsets, causal, heads=2, head_dim=4):
    """The [B, L, L] attention pattern cuDNN is handed: jax's own conversion of the per-row
    (lengths, offsets) into cuDNN's one list of segments over the flattened batch, offsets
    in elements (tokens x heads x head_dim), read back into blocks."""
    import jax

    cudnn = attention.packed_cudnn_kernel(jax.__version__)  # None where bigjax does not use it
    if cudnn is None:
        pytest.skip(f"jax {jax.__version__}: the packed cuDNN kernel is not used on it")
    q = jnp.zeros((B, L, heads, head_dim))
    seqlen, _, offset, _ = cudnn._fix_seqlen_offsets(
        jnp.asarray(lengths), jnp.asarray(lengths), jnp.asarray(offsets), jnp.asarray(offsets),
        q, q,
    )  # fmt: skip
    mask = np.zeros((B * L, B * L), bool)
    for n, start in zip(np.asarray(seqlen).ravel(), np.asarray(offset).ravel(), strict=False):
        if n <= 0:
            continue
        start //= heads * head_dim
        block = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
        mask[start : start + n, start : start + n] = block
    return np.stack([mask[b * L : (b + 1) * L, b * L : (b + 1) * L] for b in range(B)])


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_packed_segments_describe_the_mask(causal):
    # cuDNN itself needs a GPU; what it is handed (bigjax's per-row document lengths and
    # offsets, as jax flattens them over the batch) must describe exactly the einsum path's
    # mask, padding run included, in every row (an end offset per row once shifted every
    # later row's documents: NaN on an H200).
    seg = _segments()
    lengths, offsets = map(np.asarray, attention.packed_segments(seg, max_segments=10))
    assert lengths.shape == (B, 10) and offsets.shape == (B, 11)
    assert list(offsets[0][:4]) == [0, 40, 90, 120] and offsets[0][4] == -1
    assert list(lengths[0][:4]) == [40, 50, 30, 8] and lengths[0][4] == -1
    expected = np.asarray(attention.attention_mask(seg, causal))[:, 0]
    np.testing.assert_array_equal(_mask_from_cudnn_segments(lengths, offsets, causal), expected)


def test_cudnn_takes_the_smallest_segment_bound_the_rows_fit():
    # cuDNN's backward costs time in proportion to the bound (docs/benchmarks.md): a batch
    # must take the smallest bound its worst row fits, never one its rows overflow.
    def rows(*runs, length=128):
        return jnp.asarray([np.repeat(np.arange(1, n + 1), -(-length // n))[:length] for n in runs])

    bound = lambda seg: int(attention.segment_bound(seg, (8, 64)))  # noqa: E731
    assert bound(rows(1, 1)) == 0
    assert bound(rows(1, 8, 3)) == 0
    assert bound(rows(1, 9, 3)) == 1  # one row over 8 moves the whole batch up
    assert bound(rows(64, 2)) == 1
    assert bound(rows(65, 2)) == 1  # over every bound: the last (the host refuses such rows)
    padded = np.array(rows(7))  # a padding run counts as a run of its own
    padded[0, -5:] = 0
    assert bound(jnp.asarray(padded)) == 0
    padded = np.array(rows(8))
    padded[0, -5:] = 0
    assert bound(jnp.asarray(padded)) == 1


def test_rows_over_the_cudnn_bound_are_refused():
    seg = np.asarray(_segments())
    attention.check_segments(seg, max_segments=8)  # the worst row holds exactly 8 runs
    with pytest.raises(ValueError, match="9 documents.*more than the 8"):
        attention.check_segments(np.concatenate([seg[:, :-1], seg[:, :1] + 20], 1), 8)


def test_the_private_cudnn_kernel_is_used_only_on_known_jax_versions(monkeypatch):
    # jax's packed cuDNN kernel lives in jax._src. On the jax pinned here it must load (a
    # GPU run would otherwise lose it without notice); on versions outside the known range,
    # or where the module is gone, the kernel is refused by name and `auto` falls back.
    import jax

    assert attention.packed_cudnn_kernel(jax.__version__) is not None
    assert attention.packed_cudnn_kernel("0.6.2") is None
    assert attention.packed_cudnn_kernel("1.0.0") is None
    monkeypatch.setattr(jax, "__version__", "0.99.0")  # a release it is not known on
    q, seg = jnp.zeros((1, 8, 2, 4)), jnp.ones((1, 8), jnp.int32)
    with pytest.raises(NotImplementedError, match="known on jax 0.7 to 0.11.x.*'xla'"):
        attention.cudnn_attention(q, q, q, seg, causal=True, rules=())


def test_auto_picks_the_kernel_for_the_platform():
    bf16, f32 = np.dtype(jnp.bfloat16), np.dtype(np.float32)
    pick = lambda platform, dtype=bf16, head_dim=64, seq=2048: attention.resolve(  # noqa: E731
        "auto", platform, dtype=dtype, head_dim=head_dim, seq_len=seq
    )
    assert pick("cpu") == "einsum"
    assert pick("gpu") == "cudnn"
    assert pick("gpu", dtype=f32) == "einsum"  # cuDNN flash attention is 16-bit only
    assert pick("gpu", head_dim=320) == "einsum"
    assert pick("tpu") == "splash"
    assert pick("tpu", seq=100) == "einsum"  # splash tiles the sequence by 128
    assert attention.resolve("xla", "tpu", dtype=bf16, head_dim=64, seq_len=64) == "xla"


@pytest.mark.slow
def test_splash_model_trains_like_einsum():
    # Two train steps of the tiny LM on a (2, 2, 2) mesh: the splash kernel (interpreted)
    # gives the einsum run's losses and gradient norms. f32 throughout; the only difference
    # is the summation order inside attention, so 1e-5 relative.
    batches = corpus_batches(2, batch=8, seq_len=128)
    runs = []
    for impl in ("einsum", "splash"):
        cfg = tiny_config(model={"attention": impl}, data={"batch_size": 8, "seq_len": 128})
        out, _, prog = run_steps(cfg, batches, mesh_shape=(2, 2, 2))
        assert prog.attention == impl
        runs.append(out)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
