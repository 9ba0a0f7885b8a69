"""Sharded training equals single-device training; FSDP leaves no big parameter replicated."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from helpers import corpus_batches, run_steps
from jax.sharding import PartitionSpec as P

from bigjax.config import DEFAULT_RULES
from bigjax.sharding import logical_to_spec

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_to_spec_basics():
    rules = DEFAULT_RULES
    assert logical_to_spec(("embed", "mlp"), rules, MESH, (128, 384)) == P("fsdp", "tensor")
    # the table takes fsdp and tensor on vocab; the embed dim stays whole
    assert logical_to_spec(("table_vocab", "table_embed"), rules, MESH, (512, 128)) == P(
        ("fsdp", "tensor"), None
    )
    # a mesh axis is used once per array; an axis that does not divide the dim is dropped
    assert logical_to_spec(("embed", "embed"), rules, MESH, (8, 8)) == P("fsdp", None)
    assert logical_to_spec(("embed", "kv_heads"), rules, {"fsdp": 2, "tensor": 4}, (8, 2)) == P(
        "fsdp", None
    )
    assert logical_to_spec(("act_batch", None), rules, MESH, (16, 4)) == P(("data", "fsdp"), None)


@pytest.fixture(scope="module")
def single_device_run():
    cfg = tiny_config()
    batches = corpus_batches(3, 16, 64)
    metrics, state, _ = run_steps(cfg, batches, devices=jax.devices()[:1], mesh_shape=(1, 1, 1))
    return cfg, batches, metrics, jax.device_get(state.params)


@pytest.mark.slow
# (data, fsdp, tensor), and a dense model on the expert axis (data 2, tensor 2, expert 2):
# outside a MoE's experts the expert devices split the batch and the weights like FSDP
@pytest.mark.parametrize(
    "shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8), (2, 1, 1, 1, 2, 2)]
)
def test_sharded_losses_match_single_device(single_device_run, shape):
    cfg, batches, ref_metrics, ref_params = single_device_run
    metrics, state, prog = run_steps(cfg, batches, mesh_shape=shape)
    # Sharded reductions sum in a different order: f32 rounding (~1e-7 per op) compounded over
    # 3 Adam steps stays well under 1e-5 relative on the loss and 1e-4 on the parameters.
    for step, (m, r) in enumerate(zip(metrics, ref_metrics, strict=True)):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
    # the state really is laid out as the program says
    assert jax.tree.leaves(state.params)[0].sharding == jax.tree.leaves(prog.shardings.params)[0]
    if len(shape) == 6:  # the expert axis shards the weights' embed dim
        assert state.params["blocks"]["attn"]["q_DHK"].sharding.spec[1] == "expert"


@pytest.mark.slow
def test_fsdp_shards_every_large_parameter_and_moment():
    # vocab 4096 and d_ff 2048 make the embedding, head and MLP weights over 1 MiB each.
    cfg = tiny_config(model={"vocab_size": 4096, "d_ff": 2048})
    _, state, _ = run_steps(cfg, corpus_batches(1, 16, 64), mesh_shape=(1, 8, 1))
    big = 0
    for path, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state)):
        if x.nbytes > 2**20:
            big += 1
            shard_bytes = x.addressable_shards[0].data.nbytes
            assert not x.sharding.is_fully_replicated, jax.tree_util.keystr(path)
            assert shard_bytes * 8 == x.nbytes, (jax.tree_util.keystr(path), x.sharding.spec)
    assert big >= 3 * 4  # table, head, gate/up/down stacked: params + 2 Adam moments each
