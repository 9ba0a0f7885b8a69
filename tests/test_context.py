"""Context parallelism: sequences split over the `context` mesh axis train like one device,
with causal load balancing and packed documents that cross the chunk boundaries."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from helpers import (
    assert_one_line_config_error,
    assert_same_losses,
    corpus_batches,
    run_steps,
    train_tiny,
)

from bigjax import attention, context, stages
from bigjax.config import DEFAULT_RULES, MeshConfig
from bigjax.mesh import make_mesh
from bigjax.program import for_config


def _short_documents(rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions) [rows, length] of documents 5 to 90 tokens long: with chunks
    of 8 to 64 tokens, many documents start in one chunk and end in another."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for r in range(rows):
        start, doc = 0, 1
        while start < length:
            n = min(int(rng.integers(5, 90)), length - start)
            segment_ids[r, start : start + n] = doc
            positions[r, start : start + n] = np.arange(n)
            start, doc = start + n, doc + 1
    return segment_ids, positions


def _mesh(shape):
    return make_mesh(MeshConfig(shape=shape), jax.devices()[: math.prod(shape)])


def test_chunk_order_balances_causal_work():
    length, parts = 64, 4
    order = context.chunk_order(length, parts)
    assert sorted(order) == list(range(length))  # a permutation: no token lost or doubled
    chunk = length // (2 * parts)
    for device, shard in enumerate(order.reshape(parts, -1)):
        # device i holds chunks i and 2C-1-i, each in row order
        expected = [*range(device * chunk, (device + 1) * chunk)]
        expected += [*range((2 * parts - 1 - device) * chunk, (2 * parts - device) * chunk)]
        assert shard.tolist() == expected
    # Causal work (keys at or before each query) is the same on every device; contiguous
    # chunks would give the last device 7x the first's.
    work = [int(np.sum(shard + 1)) for shard in order.reshape(parts, -1)]
    assert len(set(work)) == 1, work
    contiguous = [int(np.sum(s + 1)) for s in np.arange(length).reshape(parts, -1)]
    assert contiguous[-1] > 6 * contiguous[0]


def test_balance_reorders_only_sequence_fields():
    batch = {"inputs": np.arange(16).reshape(2, 8), "labels": np.array([5, 7])}
    out = context.balance(batch, {"inputs": 1}, 2)
    np.testing.assert_array_equal(out["inputs"][0], [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(out["labels"], [5, 7])


def _attention_case(impl, causal, parts, length):
    rng = np.random.default_rng(1)
    b, h, g, k = 2, 4, 2, 16
    q, kk, v = (jnp.asarray(rng.normal(size=(b, length, n, k)), jnp.float32) for n in (h, g, g))
    segment_ids = jnp.asarray(_short_documents(b, length)[0])
    want = attention.dot_product_attention(q, kk, v, attention.attention_mask(segment_ids, causal))
    order = context.chunk_order(length, parts)
    balanced = [x[:, order] for x in (q, kk, v, segment_ids)]
    with jax.set_mesh(_mesh((1, 1, 1, parts, 1))):
        step = jax.jit(lambda *a: attention.attend(impl, *a, causal=causal, rules=DEFAULT_RULES))
        got = step(*balanced)
        hlo = step.lower(*balanced).as_text()
    assert "all_gather" in hlo or "all-gather" in hlo  # keys and values are exchanged
    # f32; the same sums in another order: ~1e-7 per op, far below a wrong mask (~1e-1).
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, order]), atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("parts", [2, 4])
def test_einsum_attention_over_context_matches_one_device(causal, parts):
    _attention_case("einsum", causal, parts, 256)


def test_auto_on_a_gpu_takes_cudnn_inside_the_context_path(monkeypatch):
    # On a GPU `auto` is cuDNN; under context parallelism it must run on each device's
    # shard of queries against the gathered keys (it once ran the unsplit kernel, which
    # gathers the whole sequence onto every context device). cuDNN needs a GPU
    # (scripts/bench/context_check.py checks it there): here jax's XLA path stands in for
    # the kernel call, to see what the context path hands it.
    calls = []
    real = jax.nn.dot_product_attention

    def recording(q, k, v, *, mask, implementation):
        calls.append((implementation, q.shape, k.shape, mask.shape))
        return real(q, k, v, mask=mask, implementation="xla")

    monkeypatch.setattr(attention, "trace_platform", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    rng = np.random.default_rng(2)
    b, length, h, g, k, parts = 2, 64, 4, 2, 16, 4
    q, kk, v = (jnp.asarray(rng.normal(size=(b, length, n, k)), jnp.bfloat16) for n in (h, g, g))
    segment_ids = jnp.asarray(_short_documents(b, length)[0])
    order = context.chunk_order(length, parts)
    with jax.set_mesh(_mesh((1, 1, 1, parts, 1))):
        step = jax.jit(lambda *a: attention.attend("auto", *a, causal=True, rules=DEFAULT_RULES))
        got = step(*(x[:, order] for x in (q, kk, v, segment_ids)))
    assert calls == [("cudnn", (b, length // parts, h, k), (b, length, g, k),
                      (b, 1, length // parts, length))]  # fmt: skip
    f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
    want = attention.dot_product_attention(*f32, attention.attention_mask(segment_ids, True))
    # bf16 inputs and output: a few bf16 ulps (2^-8) of values ~1; a wrong mask is ~1e-1 off
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want[:, order]), atol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("parts", [2, 4])
def test_splash_attention_over_context_matches_one_device(causal, parts):
    # splash in Pallas' interpreter: the TPU kernel's own mask bookkeeping (query shards of
    # a load-balanced causal mask), checked on CPU.
    _attention_case("splash", causal, parts, 512)


def _packed_batches(n, rows, length):
    batches = []
    for i, b in enumerate(corpus_batches(n, rows, length)):
        segment_ids, positions = _short_documents(rows, length, seed=i)
        weights = (segment_ids > 0).astype(np.float32)
        batches.append({**b, "segment_ids": segment_ids, "positions": positions,
                        "weights": weights})  # fmt: skip
    return batches


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    # (data, stage, fsdp, context, tensor): context 2 and 4 alone, with fsdp, with tensor
    [(1, 1, 1, 2, 1), (1, 1, 1, 4, 1), (1, 1, 2, 2, 2), (1, 1, 2, 4, 1)],
)
def test_training_over_context_matches_one_device(shape):
    cfg = tiny_config(optim={"grad_accum_steps": 2}, data={"batch_size": 8, "seq_len": 128})
    batches = _packed_batches(3, 8, 128)
    got, state, prog = run_steps(cfg, batches, jax.devices()[: math.prod(shape)], shape)
    ref, ref_state, _ = run_steps(cfg, batches, jax.devices()[:1], (1, 1, 1))
    assert prog.mesh.shape["context"] == shape[3]
    # f32; sharded sums in another order: ~1e-7 relative per op. A lost chunk, a mask that
    # crosses a document or a wrong place in the row moves the loss by > 1e-3.
    for m, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert prog.train_step._cache_size() == 1  # no recompile across steps


@pytest.mark.parametrize(
    ("shape", "model"),
    # (data, stage, fsdp, context, tensor): context alone, beside fsdp and beside tensor with
    # a scanned swiglu model; a gelu MLP unscanned and with tied embeddings
    [((1, 1, 1, 4, 1), {}), ((1, 1, 2, 2, 1), {}), ((1, 1, 1, 2, 2), {}),
     ((1, 1, 1, 4, 1), {"mlp": "gelu", "scan_layers": False, "tie_embeddings": True})],
)  # fmt: skip
def test_no_activation_is_gathered_over_the_whole_sequence(shape, model):
    # Context parallelism keeps 1/C of each row's tokens per device; only attention's keys,
    # values and segment ids are gathered over `context` (inside its shard_map). Projections
    # that merged [B, L] into one dim of rows lost L's sharding, and XLA all-gathered their
    # inputs and saved activations over the whole sequence, forward and backward (on a v5p
    # compile at context 4: 1.6x the step's temporary memory); beside tensor parallelism it
    # gathered activations rather than the FSDP-sharded weights (llama_8b at 131072 tokens:
    # 54.90 against 11.59 GiB a device).
    seq_len, rows = 80, 8  # a length no weight dim has (d_model 128, d_ff 384, vocab 512)
    cfg = tiny_config(model=model, data={"batch_size": rows, "seq_len": seq_len},
                      mesh={"shape": shape})  # fmt: skip
    mesh = _mesh(shape)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        hlo = prog.train_step.lower(*prog.abstract_inputs()).compile().as_text()
    # "%name = f32[8,80,384]{2,0,1} all-gather(...)": the gathered shape, [rows, L, ...]
    gathered = re.compile(rf"= \S*\[\d+,{seq_len}[,\]]\S* all-gather(-start)?\(")
    whole_rows = [line for line in hlo.splitlines() if gathered.search(line)]
    assert whole_rows, "attention gathers its keys and values over context"
    outside_attention = [g for g in whole_rows if "shard_map" not in g]
    assert outside_attention == [], outside_attention[:3]


# capacity 1.25 * L * 2 / 4: 80 slots at 128 tokens; 70 at 112, which context 4 does not divide
@pytest.mark.parametrize("seq_len", [128, 112])
def test_capacity_experts_split_their_slots_over_context(seq_len):
    # Capacity MoE's [B, E, C, D] slots have no sequence dim: XLA ran every expert on every
    # slot on each context device and all-reduced the products (2.8x FSDP's temporary
    # memory here; 3.3x on a v5p compile). Split like the sequence, each device runs its
    # share of the slots, as FSDP's batch split does. XLA's own accounting (deterministic
    # for a jaxlib); the bound leaves room for its scheduling between versions.
    def temp_mib(shape):
        model = {"num_experts": 4, "experts_per_token": 2}
        cfg = tiny_config(model=model, data={"batch_size": 8, "seq_len": seq_len},
                          mesh={"shape": shape})  # fmt: skip
        mesh = _mesh(shape)
        with jax.set_mesh(mesh):
            prog = for_config(cfg, mesh)
            compiled = prog.train_step.lower(*prog.abstract_inputs()).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    context, fsdp = temp_mib((1, 1, 1, 4, 1, 1)), temp_mib((1, 1, 4, 1, 1, 1))
    assert context < 1.25 * fsdp, (context, fsdp)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "model"),
    # (data, stage, fsdp, context, tensor): 2 stages x context 2 with tensor inside each; 4
    # stages x context 2; 2 stages x 2 laps (interleaved) x context 2 with fsdp and full remat,
    # as a masked LM (the bidirectional mask; masks drawn in the row's order)
    [((1, 2, 1, 2, 2), {}), ((1, 4, 1, 2, 1), {}),
     ((1, 2, 2, 2, 1), {"pipeline_interleave": 2, "remat": "full", "causal": False})],
)  # fmt: skip
def test_pipeline_stages_and_context_together_train_like_one_device(shape, model):
    # Each stage's layers run under the pipeline's vmap over `stage`; inside them attention
    # gathers keys and values over `context` (shard_map), and the pipeline's buffer keeps
    # each row's tokens split over `context` from stage to stage.
    model = {"num_layers": 8, "pipeline_microbatches": 4, **model}
    task = "lm" if model.get("causal", True) else "mlm"
    cfg = tiny_config(model=model, data={"batch_size": 8, "seq_len": 64, "task": task})
    batches = _packed_batches(2, 8, 64)
    got, state, prog = run_steps(cfg, batches, jax.devices()[: math.prod(shape)], shape)
    ref, ref_state, _ = run_steps(cfg, batches, jax.devices()[:1], (1, 1, 1))
    assert prog.context_parts == 2 and prog.mesh.shape["stage"] == shape[1]
    # f32; the same sums in another order (pipeline micro-batches, sharded reductions): ~1e-7
    # relative per op. A stage skipped, a chunk lost or a mask crossing documents moves the
    # loss by > 1e-3.
    for m, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-4)
    params = stages.take_layers(state.params, np.argsort(prog.layer_order))  # model order
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert prog.train_step._cache_size() == 1  # no recompile across steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "groups",
    [{"data": {"task": "mlm"}, "model": {"causal": False}},  # BERT's 80/10/10 masks
     {"robust": {"token_dropout": 0.1, "span_mask": 0.2}},  # random tokens, masked spans
     {"model": {"num_experts": 4, "moe_capacity_factor": 0.5}}],  # capacity drops
)  # fmt: skip
def test_what_is_drawn_or_ranked_per_token_does_not_depend_on_the_context_size(groups):
    # Each token's draws are made in the row's order, then moved to the balanced order the
    # context axis holds, and MoE capacity ranks tokens in the row's order: 2 parts mask
    # and drop the same tokens as one device. In the balanced order instead, other tokens
    # are masked or dropped and the first loss moves by > 1e-3 (measured here: MLM 6.5911
    # on context 2 vs 6.7927; text noise 6.6752 vs 6.6896; MoE 6.6024 vs 6.5994), and a
    # masked span crossing the middle of a balanced part covers tokens half a row apart.
    data = {"batch_size": 8, "seq_len": 64, **groups.get("data", {})}
    cfg = tiny_config(**{**groups, "data": data})
    batches = _packed_batches(2, 8, 64)
    got, _, prog = run_steps(cfg, batches, jax.devices()[:2], (1, 1, 1, 2, 1))
    ref, _, _ = run_steps(cfg, batches, jax.devices()[:1], (1, 1, 1))
    assert prog.context_parts == 2
    for m, r in zip(got, ref, strict=True):  # f32, sums in another order: ~1e-7 per op
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)


@pytest.mark.slow
def test_resume_onto_another_context_size(tmp_path):
    data = {"batch_size": 8, "seq_len": 128}
    train_tiny(tmp_path / "run", 2, (1, 1, -1, 2, 1), data=data)
    train_tiny(tmp_path / "run", 4, (1, 1, -1, 4, 1), data=data)  # resumes at 2 on context 4
    train_tiny(tmp_path / "ref", 4, (1, 1, -1, 1, 1), data=data)  # no context at all
    # Same data order and state across the resume; f32 sums in another order only.
    assert_same_losses(tmp_path / "run", tmp_path / "ref", (1, 2, 3, 4), rtol=1e-5)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"mesh": {"shape": (1, 1, 1, 4, 1)}, "data": {"seq_len": 100}},
         "data.seq_len: 100 cannot be cut into 2 x context = 8"),
        ({"mesh": {"shape": (1, 1, 1, 2, 1), "rules": {"act_seq": None}}},
         "mesh.rules.act_seq: must include 'context'"),
        ({"mesh": {"shape": (1, 1, 1, 2, 1)}, "data": {"task": "classify"}},
         "data.task=classify"),
        ({"mesh": {"shape": (1, 1, -1, 1)}}, "mesh.shape: needs 6 entries"),
    ],
)  # fmt: skip
def test_impossible_combinations_are_named_in_one_line(groups, message):
    assert_one_line_config_error(groups, message.replace("(", r"\("))


def test_three_entry_mesh_shapes_still_mean_data_fsdp_tensor():
    cfg = tiny_config(mesh={"shape": (2, -1, 1)})
    assert cfg.mesh.shape == (2, 1, -1, 1, 1, 1)
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 4, "context": 1, "tensor": 1,
                                "expert": 1}  # fmt: skip


def test_five_entry_mesh_shapes_are_the_layout_before_expert():
    # (data, stage, fsdp, context, tensor): what configs and run directories wrote before the
    # expert axis; the run restores onto the same mesh, expert 1
    cfg = tiny_config(mesh={"shape": (2, 1, -1, 2, 1), "dcn_shape": (1, 1, 1, 1, 1)})
    assert cfg.mesh.shape == (2, 1, -1, 2, 1, 1) and cfg.mesh.dcn_shape == (1,) * 6
    sizes = dict(make_mesh(cfg.mesh).shape)
    assert (sizes["data"], sizes["fsdp"], sizes["context"], sizes["expert"]) == (2, 2, 2, 1)
