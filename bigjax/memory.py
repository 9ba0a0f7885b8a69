"""Memory a run needs, estimated from shapes before anything is built: per device (state,
gradients, activations) and on the host (the input pipeline, the checkpoint's host copy). A
config that cannot fit is refused in one line, instead of growing until the kernel's OOM
killer ends it without a word (`data.batch_size=100000000` once did exactly that)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bigjax import attention, lora, models, optim, stages
from bigjax.config import ConfigError, TrainConfig
from bigjax.layers import compute_dtype
from bigjax.sharding import batch_shards, context_parts, is_spec, num_stages
from bigjax.state import TrainState, abstract_state, state_specs

GiB = 2**30
# Host bytes per global batch row this process packs: Python objects of its packing stream
# (iterators, Grain datasets) plus, per token, the packed and model arrays, their prefetch
# copies and first-fit's bins. Measured on the built-in corpus (16-20 KiB a row; 40-160 bytes
# a token, concat to first_fit), rounded up.
ROW_BYTES = 20 << 10
TOKEN_BYTES = 160


def activation_bytes_per_device(
    cfg: TrainConfig, mesh_shape: dict[str, int], kernel: str = "einsum"
) -> float:
    """Estimate of what the backward pass keeps per device, for one micro-batch.

    Per token and layer, bytes of the compute dtype, as (residual-stream, tensor-sharded):
    with no remat ~ (4 D, 6 D + 3 F + H L) (norm inputs and residual adds; q/k/v/attention
    output, the SwiGLU branches, the attention probabilities); with save_matmuls the matmul
    outputs ~ (2 D, 2 D + 3 F); with full remat only the layer input (D, 0). The residual part
    is split over `tensor` only with sequence parallelism (`act_res_seq`). Plus f32 logits and
    their gradient (2 x 4 V per token). A flash kernel (`kernel` cudnn or splash) keeps no
    probabilities, only their log-normaliser (H L -> H). With context parallelism the tokens
    are 1/C of each row, plus one layer's gathered keys and values. XLA's compiled memory
    analysis is the real answer (`bigjax plan` on a TPU topology).
    """
    m = cfg.model
    dtype_bytes = np.dtype("float32" if m.dtype == "float32" else "bfloat16").itemsize
    micro, rules = cfg.data.batch_size // cfg.optim.grad_accum_steps, cfg.mesh.rules
    # what the mesh cuts: the micro-batch's rows, each row's tokens, the layers
    rows = micro / batch_shards(rules, mesh_shape, micro)
    num_parts = context_parts(rules, mesh_shape, cfg.data.seq_len)
    stage_count = num_stages(rules, mesh_shape, m.num_layers)
    # Context parallelism: a device holds 1/C of each row's tokens, and while one layer
    # attends, the keys and values of its rows gathered whole.
    tokens = rows * cfg.data.seq_len / num_parts
    kv_dim = m.num_kv_heads * m.dim_per_head
    gathered = 0 if num_parts == 1 else rows * cfg.data.seq_len * 2 * kv_dim * dtype_bytes
    probs_per_head = 2 if kernel in ("cudnn", "splash") else cfg.data.seq_len  # f32 lse: 2
    residual, split = {
        "none": (4 * m.d_model, 6 * m.d_model + 3 * m.d_ff + m.num_heads * probs_per_head),
        "save_matmuls": (2 * m.d_model, 2 * m.d_model + 3 * m.d_ff),
        "full": (m.d_model, 0),
    }[m.remat]
    tensor = mesh_shape["tensor"]
    sequence_parallel = "tensor" in (dict(rules).get("act_res_seq") or ())
    per_layer = residual / (tensor if sequence_parallel else 1) + split / tensor
    # Pipeline stages: a device keeps its N/S layers' activations for every tick it works,
    # (V M + S - 1) ticks of 1/(V M) of the rows each (bigjax/stages.py).
    layers = float(m.num_layers)
    pipeline = stages.schedule(stage_count, m.pipeline_microbatches, m.pipeline_interleave)
    if pipeline:
        layers = m.num_layers / pipeline["stages"] / (1 - pipeline["bubble"])
        gathered /= pipeline["microbatches"]  # a layer attends one pipeline micro-batch
    return tokens * (layers * per_layer * dtype_bytes + 8 * m.vocab_size / tensor) + gathered


def _shard_factor(spec: Any, mesh_shape: dict[str, int]) -> int:
    axes = [a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
    return math.prod(mesh_shape[a] for a in axes)


def planned_state_bytes(cfg: TrainConfig, mesh_shape: dict[str, int]) -> tuple[float, float]:
    """`state_bytes_per_device` of the state `cfg` would build on a mesh of `mesh_shape` (one
    that need not exist here: `bigjax plan`)."""
    _, graph_state = models.abstract(cfg.model, cfg.mesh.rules)
    tx = optim.make_optimizer(cfg.optim, cfg.num_steps, lora.trainable_fn(cfg.finetune),
                              router_bias_rate=cfg.model.moe_bias_rate)  # fmt: skip
    abstract = abstract_state(graph_state, tx, cfg.finetune)
    return state_bytes_per_device(
        abstract, state_specs(graph_state, abstract, tx, mesh_shape, cfg.mesh.rules), mesh_shape
    )


def state_bytes_per_device(
    abstract: TrainState[jax.ShapeDtypeStruct],
    specs: TrainState[PartitionSpec],
    mesh_shape: dict[str, int],
) -> tuple[float, float]:
    """(parameters, optimizer state) bytes per device: exact, from the abstract state and its
    shardings' specs on `mesh_shape` (nothing is allocated)."""

    def per_device(tree: Any, spec_tree: Any) -> float:
        leaves = jax.tree.leaves(tree)
        spec_leaves = jax.tree.leaves(spec_tree, is_leaf=is_spec)
        return sum(
            x.size * x.dtype.itemsize / _shard_factor(s, mesh_shape)
            for x, s in zip(leaves, spec_leaves, strict=True)
        )

    return per_device(abstract.params, specs.params), per_device(
        abstract.opt_state, specs.opt_state
    )


def attention_kernel(cfg: TrainConfig, platform: str) -> str:
    """The attention kernel `model.attention` resolves to on `platform` (what it keeps for the
    backward pass differs: a flash kernel keeps no probabilities)."""
    m = cfg.model
    return attention.resolve(
        m.attention,
        platform,
        dtype=compute_dtype(m.dtype, platform),
        head_dim=m.dim_per_head,
        seq_len=cfg.data.seq_len,
    )


def device_estimate(
    cfg: TrainConfig, mesh_shape: dict[str, int], kernel: str, state_bytes: tuple[float, float]
) -> dict[str, float]:
    """Bytes per device: parameters, optimizer, gradients, activations, and their total, for
    a state of `state_bytes` (parameters, optimizer) per device."""
    params_b, opt_b = state_bytes
    # gradients like the params; the accumulation scan carries a second buffer
    grads_b = params_b * (2 if cfg.optim.grad_accum_steps > 1 else 1)
    act_b = activation_bytes_per_device(cfg, mesh_shape, kernel)
    parts = {"parameters": params_b, "optimizer": opt_b, "gradients": grads_b}
    return {**parts, "activations": act_b, "total": sum(parts.values()) + act_b}


def host_data_bytes(cfg: TrainConfig, rows: int) -> float:
    """Host bytes of the input pipeline packing `rows` rows of every global batch."""
    return rows * (ROW_BYTES + TOKEN_BYTES * (cfg.data.seq_len + 1))


def available_host_bytes() -> int:
    """Memory the kernel can give this process now (MemAvailable: free plus reclaimable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_limit(device: jax.Device) -> int | None:
    """A device's own memory (bytes), or None where it is the host's (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def check_fits(need: float, devices: Sequence[jax.Device], what: str, fix: str) -> None:
    """Refuses in one line (`what` needs ..., then `fix`) an allocation of `need` bytes spread
    evenly over `devices` that their memory, or the host's free memory on CPU, cannot hold:
    XLA's out-of-memory traceback otherwise (a KV cache is allocated whole at the start)."""
    limit = device_limit(devices[0])
    have = limit * len(devices) if limit else available_host_bytes()
    if need > have:
        where = "on the devices" if limit else "of host memory are free"
        raise ConfigError(
            f"{what} needs {need / GiB:,.1f} GiB, {have / GiB:,.1f} GiB {where}; {fix}"
        )


def check(
    cfg: TrainConfig,
    abstract: TrainState[jax.ShapeDtypeStruct],
    shardings: TrainState[NamedSharding],
    kernel: str,
    devices: Sequence[jax.Device],
) -> None:
    """Raises ConfigError, in one line with the figures and what to change, if the run
    cannot fit: per device on an accelerator, or all of it in host memory on CPU (where the
    devices are the host). `abstract` and `shardings`: the state's; `kernel`: the attention
    kernel it trains with; `devices`: this process's."""
    mesh_shape = dict(jax.tree.leaves(shardings)[0].mesh.shape)
    specs = jax.tree.map(lambda s: s.spec, shardings)
    state_bytes = state_bytes_per_device(abstract, specs, mesh_shape)
    per_device = device_estimate(cfg, mesh_shape, kernel, state_bytes)
    rows = cfg.data.batch_size // jax.process_count()
    host = {
        "input pipeline": host_data_bytes(cfg, rows),
        # the async checkpoint copies this process's shards of the state to the host
        "checkpoint copy": (per_device["parameters"] + per_device["optimizer"]) * len(devices),
    }
    limit = device_limit(devices[0])
    budgets = (
        [] if limit is None else [(f"per device ({devices[0].device_kind})", per_device, limit)]
    )
    if limit is None:  # CPU: the devices' memory is the host's
        host = {"devices": per_device["total"] * len(devices), **host}
    budgets.append(("of host memory", host, available_host_bytes()))
    for where, parts, have in budgets:
        need = parts.get("total", sum(parts.values()))
        if need <= have:
            continue
        shown = ", ".join(f"{k} {v / GiB:,.2f}" for k, v in parts.items() if k != "total")
        raise ConfigError(
            f"memory: this config needs about {need / GiB:,.1f} GiB {where} ({shown} GiB; "
            f"data.batch_size={cfg.data.batch_size}, data.seq_len={cfg.data.seq_len}, "
            f"optim.grad_accum_steps={cfg.optim.grad_accum_steps}) but {have / GiB:,.1f} GiB "
            "is available. Lower data.batch_size or raise optim.grad_accum_steps (smaller "
            "micro-batches), set model.remat=full, or shard over more devices; `bigjax plan` "
            "shows the estimate in full."
        )
