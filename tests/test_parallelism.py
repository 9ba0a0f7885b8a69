"""Every parallelism combination trains like one device: meshes x remat x accumulation x
sequence parallelism x precision x multi-slice layout."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from helpers import corpus_batches, run_steps
from jax.sharding import AxisType, Mesh

from bigjax.config import MESH_AXES, ConfigError, MeshConfig, full_mesh_shape
from bigjax.mesh import granules, hybrid_device_array, make_mesh

NO_SP = {"act_res_seq": None}

COMBINATIONS = {
    "fsdp2-tensor4/remat-full/accum2": ((1, 2, 4), {"remat": "full"}, {"grad_accum_steps": 2}, {}),
    "data2-fsdp2-tensor2/loop/save-matmuls": (
        (2, 2, 2),
        {"scan_layers": False, "remat": "save_matmuls"},
        {},
        {},
    ),
    "data2-tensor4/no-sequence-parallel": ((2, 1, 4), {}, {}, NO_SP),
    "tensor8/accum4": ((1, 1, 8), {}, {"grad_accum_steps": 4}, {}),
    "data4-fsdp2/adafactor/tied": ((4, 2, 1), {"tie_embeddings": True}, {"name": "adafactor"}, {}),
}


def _config(model, optim, rules, **extra):
    return tiny_config(model=model, optim=optim, mesh={"rules": rules}, **extra)


def _assert_same_training(got, ref, rtol_loss, rtol_params, atol_params):
    (metrics, state), (ref_metrics, ref_state) = got, ref
    for step, (m, r) in enumerate(zip(metrics, ref_metrics, strict=True)):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=rtol_loss, err_msg=f"step {step}")
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=10 * rtol_loss)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol_params, atol=atol_params)


def _single_device(cfg, batches):
    metrics, state, _ = run_steps(cfg, batches, devices=jax.devices()[:1], mesh_shape=(1, 1, 1))
    return metrics, jax.device_get(state)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMBINATIONS)
def test_combination_matches_single_device(name):
    shape, model, optim, rules = COMBINATIONS[name]
    cfg = _config(model, optim, rules)
    batches = corpus_batches(3, 16, 64)
    metrics, state, prog = run_steps(cfg, batches, mesh_shape=shape)
    # f32 everywhere; sharded reductions only sum in another order: rounding (~1e-7 per op)
    # over 3 optimizer steps stays far below 1e-5 on the loss and 1e-4 on the parameters,
    # while a wrong shard, a lost micro-batch or a missed all-reduce moves them by > 1e-3.
    _assert_same_training((metrics, state), _single_device(cfg, batches), 1e-5, 1e-4, 1e-5)
    assert prog.mesh.shape == dict(zip(MESH_AXES, full_mesh_shape(shape), strict=True))


@pytest.mark.slow
def test_bf16_compute_with_f32_master_weights_matches_single_device():
    cfg = _config({"dtype": "bfloat16"}, {"grad_accum_steps": 2}, {})
    batches = corpus_batches(3, 16, 64)
    metrics, state, _ = run_steps(cfg, batches, mesh_shape=(2, 2, 2))
    # The policy: parameters, gradients, optimizer moments and the loss stay float32; only
    # matmul inputs and activations are bfloat16.
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        assert leaf.dtype in (np.float32, np.int32), leaf.dtype
    assert metrics[0]["loss"].dtype == np.float32
    # bf16 keeps 8 mantissa bits: partial sums rounded in another order differ by a few bf16
    # ulps (2^-8 = 0.4%) per op, so 2% on the loss. Adam turns the sign of a near-zero
    # gradient entry into a full +-lr step, so single weights may differ by ~2 lr; compare the
    # whole update instead: within 5% of its norm (a wrong batch or a missing gradient shard
    # changes it by ~100%).
    ref_metrics, ref_state = _single_device(cfg, batches)
    for m, r in zip(metrics, ref_metrics, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=2e-2)
    _, init, _ = run_steps(cfg, [], devices=jax.devices()[:1], mesh_shape=(1, 1, 1))
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    update, ref_update = (flat(s.params) - flat(init.params) for s in (state, ref_state))
    assert np.linalg.norm(update - ref_update) < 0.05 * np.linalg.norm(ref_update)


@pytest.mark.slow
def test_multi_slice_layout_and_training():
    devices = jax.devices()
    # Two stand-in slices of 4 devices: dcn (2,1,1) x per-slice (1,2,2) = mesh (2,2,2)
    # (data, fsdp, tensor; stage and context 1)
    per_slice, dcn = full_mesh_shape((1, 2, 2)), full_mesh_shape((2, 1, 1))
    array = hybrid_device_array(per_slice, dcn, [devices[:4], devices[4:]])
    assert array.shape == (2, 1, 2, 1, 2, 1)
    # only the data axis (the DCN one) crosses slices: each data index is one whole slice
    assert {d.id for d in array[0].flat} == {0, 1, 2, 3}
    assert {d.id for d in array[1].flat} == {4, 5, 6, 7}
    mesh = Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    cfg = tiny_config()
    batches = corpus_batches(3, 16, 64)
    metrics, state, _ = run_steps(cfg, batches, mesh=mesh)
    _assert_same_training((metrics, state), _single_device(cfg, batches), 1e-5, 1e-4, 1e-5)


def test_dcn_shape_must_match_the_slices():
    # one process, no TPU slices: one granule
    assert len(granules(jax.devices())) == 1
    with pytest.raises(
        ConfigError, match=r"dcn_shape: \(2, 1, 1, 1, 1, 1\) needs 2 slices, found 1"
    ):
        make_mesh(MeshConfig(shape=(1, -1, 1), dcn_shape=(2, 1, 1)))


def _compiled(cfg, shape):
    batches = corpus_batches(1, 16, 64)
    _, state, prog = run_steps(cfg, batches, mesh_shape=shape)
    with jax.set_mesh(prog.mesh):  # activation constraints resolve against the set mesh
        return prog.train_step.lower(state, prog.to_global(batches[0])).compile()


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_sequence_parallelism_splits_the_residual_stream(remat):
    with_sp = _compiled(_config({"remat": remat}, {}, {}), (1, 1, 8))
    without = _compiled(_config({"remat": remat}, {}, NO_SP), (1, 1, 8))
    # The residual stream is split on its sequence over `tensor`: XLA gathers it back before
    # each tensor-parallel matmul (all-gathers appear; CPU lowers reduce-scatter to an
    # all-reduce + slice) and the activations it keeps take a fraction of the memory.
    assert " all-gather" in with_sp.as_text() and " all-gather" not in without.as_text()
    mem, mem_without = (c.memory_analysis().temp_size_in_bytes for c in (with_sp, without))
    assert mem < 0.8 * mem_without, (mem, mem_without)  # measured: 0.65x with and without remat
