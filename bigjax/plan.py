"""`bigjax plan`: will this config fit and how fast will it run, before paying for the pod.

Two levels of answer:
- analytic, anywhere: parameters, FLOPs per token and step, per-device bytes of parameters and
  optimizer state (exact, from the sharding rules on the target mesh), an activation estimate,
  and the step time at a given MFU;
- compiled, with the `tpu` extra (libtpu) installed: the real train step compiled ahead of time
  for the TPU topology on this CPU-only machine, and XLA's memory analysis against the HBM.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from bigjax import experts, memory, metrics, models, platforms, progress, stages
from bigjax.config import MESH_AXES, ConfigError, ModelConfig, TrainConfig
from bigjax.mesh import resolve_shape, tune
from bigjax.sharding import batch_shards, num_stages

GiB = 2**30

# Per chip: HBM bytes, dense bf16 peak FLOP/s, physical layout (3-D torus or 2-D).
TPU_CHIPS = {
    "v4": (32 * GiB, 275e12, 3),
    "v5p": (95 * GiB, 459e12, 3),
    "v5e": (16 * GiB, 197e12, 2),
    "v6e": (32 * GiB, 918e12, 2),
}
# Cloud names count TensorCores for v4/v5p ("v5p-128" = 64 chips) and chips for v5e/v6e.
CORES_PER_CHIP_IN_NAME = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
GPU_HBM = {"A100": 80 * GiB, "H100": 80 * GiB, "H200": 141 * GiB}


@dataclasses.dataclass(frozen=True)
class Target:
    """What the plan is for: a TPU slice, or N GPUs of one kind."""

    name: str
    num_devices: int
    hbm_per_device: float
    peak_per_device: float
    tpu_generation: str = ""  # set for TPUs: enables the ahead-of-time compile
    tpu_shape: str = ""  # e.g. '4x4x4', one slice
    num_slices: int = 1  # multi-slice: slices joined over DCN (`mesh.dcn_shape`)
    fp8_peak_per_device: float = 0.0  # 0: no fp8 matrix units (fp8 runs at the bf16 rate)


def _torus(chips: int, dims: int) -> str:
    """Cloud TPU's slice shape for `chips` chips: 3-D slices grow 2x2x1, 2x2x2, 2x2x4, 2x4x4,
    4x4x4, ...; 2-D slices 1x1, 1x2, 2x2, 2x4, 4x4, ..."""
    if chips < 1 or chips & (chips - 1) or (dims == 3 and chips < 4):
        raise ConfigError(f"--topology: no {dims}-D TPU slice has {chips} chips.")
    order: Iterator[int]
    if dims == 2:
        shape, order = [1, 1], itertools.cycle([1, 0])
    else:
        shape, order = [2, 2, 1], itertools.chain([2], itertools.cycle([2, 1, 0]))
    while math.prod(shape) < chips:
        shape[next(order)] *= 2
    return "x".join(map(str, shape))


def parse_topology(name: str) -> Target:
    """'v5p-128', 'v4-32', 'v5e-16' (or 'v5litepod-16'), 'v6e-8' -> Target; a prefix 'Kx'
    ('2xv5p-128') means K such slices joined over DCN."""
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m or m.group(1) == "0":
        raise ConfigError(
            f"--topology {name!r}: expected a Cloud TPU name like v5p-128, v4-32, v5e-16 or "
            "v6e-8, or 2xv5p-128 for two slices (for GPUs use --devices N --device-kind H100)."
        )
    slices = int(m.group(1) or 1)
    gen = "v5e" if m.group(2) == "v5litepod" else m.group(2)
    per_chip = CORES_PER_CHIP_IN_NAME[gen]
    if int(m.group(3)) % per_chip:  # v5p-9 is no slice, not a v5p-8
        raise ConfigError(f"--topology {name!r}: {gen} names count TensorCores, {per_chip} a "
                          f"chip; use a multiple of {per_chip} ({gen}-8 is 4 chips).")  # fmt: skip
    chips = int(m.group(3)) // per_chip
    hbm, peak, dims = TPU_CHIPS[gen]
    return Target(name, chips * slices, hbm, peak, gen, _torus(chips, dims), slices)


def mesh_shape_for(cfg: TrainConfig, target: Target) -> dict[str, int]:
    """The full mesh on the target: per-slice `mesh.shape` times `mesh.dcn_shape`."""
    if math.prod(cfg.mesh.dcn_shape) != target.num_slices:
        raise ConfigError(
            f"mesh.dcn_shape: {tuple(cfg.mesh.dcn_shape)} spans {math.prod(cfg.mesh.dcn_shape)} "
            f"slices but {target.name} has {target.num_slices}; set e.g. "
            f"--config.mesh.dcn_shape={target.num_slices},1,1."
        )
    per_slice = resolve_shape(cfg.mesh.shape, target.num_devices // target.num_slices)
    sizes = (i * d for i, d in zip(per_slice, cfg.mesh.dcn_shape, strict=True))
    return dict(zip(MESH_AXES, sizes, strict=True))


def gpu_target(devices: int, kind: str) -> Target:
    if devices < 1:  # -8 planned a negative memory and step time
        raise ConfigError(f"--devices {devices}: give the number of GPUs, 1 or more.")
    if kind not in GPU_HBM:
        raise ConfigError(f"--device-kind {kind!r}: known kinds are {', '.join(GPU_HBM)}.")
    fp8 = metrics.DATASHEET_FP8_PEAK_FLOPS.get(kind, 0.0)
    return Target(f"{devices}x {kind}", devices, GPU_HBM[kind], metrics.datasheet_peak(kind),
                  fp8_peak_per_device=fp8)  # fmt: skip


def _accelerator_config(cfg: TrainConfig) -> TrainConfig:
    """'auto' compute dtype means bfloat16 on the accelerator being planned for."""
    if cfg.model.dtype != "auto":
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))


def analytic(
    cfg: TrainConfig, target: Target, mfu: float, kernel: str = "einsum"
) -> dict[str, Any]:
    """Parameter, FLOP, memory and time figures from shapes and the sharding rules alone."""
    cfg = _accelerator_config(cfg)
    mesh_shape = mesh_shape_for(cfg, target)
    _, graph_state = models.abstract(cfg.model, cfg.mesh.rules)
    num_params = models.count_params(graph_state)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = models.FLOPS_PER_TOKEN[cfg.model.family](cfg.model, cfg.data.seq_len)
    state_bytes = memory.planned_state_bytes(cfg, mesh_shape)
    bytes_ = memory.device_estimate(cfg, mesh_shape, kernel, state_bytes)
    params_b, opt_b, grads_b = bytes_["parameters"], bytes_["optimizer"], bytes_["gradients"]
    act_b = bytes_["activations"]
    flops_per_step = flops_per_token * tokens_per_step
    m = cfg.model
    pipeline = stages.schedule(
        num_stages(cfg.mesh.rules, mesh_shape, m.num_layers),
        m.pipeline_microbatches,
        m.pipeline_interleave,
    )
    busy = 1.0 - (pipeline["bubble"] if pipeline else 0.0)  # stages idle in the bubble
    fp8_step = _fp8_flops_per_token(m) * tokens_per_step
    fp8_peak = target.fp8_peak_per_device or target.peak_per_device
    device_s = (flops_per_step - fp8_step) / target.peak_per_device + fp8_step / fp8_peak
    step_s = device_s / (target.num_devices * mfu * busy)
    return {
        "target": target.name,
        "devices": target.num_devices,
        "mesh": mesh_shape,
        "params": num_params,
        "flops_per_token": flops_per_token,
        "flops_per_step": flops_per_step,
        "params_bytes_per_device": params_b,
        "optimizer_bytes_per_device": opt_b,
        "gradient_bytes_per_device": grads_b,
        "activation_bytes_per_device_estimate": act_b,
        "total_bytes_per_device_estimate": params_b + grads_b + opt_b + act_b,
        "hbm_per_device": target.hbm_per_device,
        "mfu": mfu,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "pipeline": pipeline,
        "experts": _experts(cfg, mesh_shape),
        "fp8": None
        if not fp8_step
        else {
            "share": fp8_step / flops_per_step,
            "peak_per_device": target.fp8_peak_per_device,
        },
    }


def _fp8_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token in fp8 matmuls: the dense projections of attention and the
    MLP, or a MoE's active experts (routed and shared; not the router), forward + both
    backward products: 6 per weight; 0 unless matmul_precision=fp8."""
    if m.matmul_precision != "fp8":
        return 0.0
    D, F, H, G, K = m.d_model, m.d_ff, m.num_heads, m.kv_heads, m.dim_per_head
    mlp = (3 if m.mlp == "swiglu" else 2) * D * F
    if m.num_experts:
        mlp = (m.experts_per_token + m.moe_shared_experts) * 3 * D * F
    return 6.0 * m.num_layers * (2 * D * H * K + 2 * D * G * K + mlp)


def _experts(cfg: TrainConfig, mesh_shape: dict[str, int]) -> dict[str, float] | None:
    """A dropless MoE's expert parallelism and all-to-all per micro-batch, or None."""
    m = cfg.model
    if not m.num_experts or m.moe_dispatch != "dropless":
        return None
    rows = cfg.data.batch_size // max(cfg.optim.grad_accum_steps, 1)
    return experts.exchange_plan(
        cfg.mesh.rules, mesh_shape, (rows, cfg.data.seq_len), m.num_experts,
        m.experts_per_token, m.d_model, jnp.dtype(m.dtype).itemsize, m.moe_exchange_factor,
    )  # fmt: skip


def compiled(cfg: TrainConfig, target: Target) -> dict[str, Any]:
    """Compiles the real train step for a TPU topology ahead of time (needs libtpu)."""
    from jax.experimental import topologies

    from bigjax.mesh import for_run
    from bigjax.program import for_config

    cfg = _accelerator_config(cfg)
    platforms.allow_compile_only_libtpu()  # no chips here: a run beside must not block this
    options: dict[str, Any] = {}
    if CORES_PER_CHIP_IN_NAME[target.tpu_generation] == 2:
        # one device per chip, as a v4 or v5p VM runs (megacore); libtpu's v4 default is
        # a device per TensorCore, which jax refuses to lay a mesh over
        options["chip_config_name"] = "megacore"
    chips = [int(n) for n in target.tpu_shape.split("x")]
    if math.prod(chips) < 4:
        # libtpu lays a topology over hosts of 2x2x1 chips: a slice smaller than that (v5e-1,
        # v6e-2) is one host of its own size (the default was libtpu's "not divisible" error)
        options["chips_per_host_bounds"] = [*chips, 1]
    try:
        topo = topologies.get_topology_desc(
            topology_name=f"{target.tpu_generation}:{target.tpu_shape}",
            platform="tpu",
            num_slices=target.num_slices,
            **options,
        )
    except jax.errors.JaxRuntimeError as e:  # on a TPU VM whose chips another process drives
        busy = platforms.busy_error(e)
        if busy is None:
            raise
        raise busy from None
    devices: list[Any] = list(topo.devices)  # TPU devices of a topology (compile-only)
    cfg, mesh = for_run(cfg, devices)
    # Built outside the mesh context: setup runs small eager ops, and these TPU devices can
    # only compile. Tracing (inside) needs the mesh for the activation constraints.
    prog = for_config(cfg, mesh)
    with jax.set_mesh(mesh):
        state, batch = prog.abstract_inputs()
        lowered = prog.train_step.lower(state, batch)
    hbm = target.hbm_per_device * target.num_devices / len(devices)
    base = {
        "compiled_devices": len(devices),
        "device_kind": devices[0].device_kind,
        "hbm_per_device": hbm,
    }
    try:
        executable = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # XLA:TPU refuses to compile a program that cannot fit: that is the answer.
        return {
            **base,
            "total_bytes_per_device": hbm_needed(str(e)),
            "fits": False,
            "compiler": " ".join(line.strip() for line in str(e).splitlines()[:4])[:500],
        }
    mem = executable.memory_analysis()
    if mem is None:
        raise RuntimeError(f"the TPU compiler gave no memory analysis for {target.tpu_shape}")
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    return {
        **base,
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "total_bytes_per_device": total,
        "fits": total <= hbm,
    }


def hbm_needed(message: str) -> float:
    """Bytes per device an XLA:TPU out-of-memory error says the program needs: its "Used
    96.10G of 95.74G hbm" (its breakdown that follows holds other "(43.05G)" figures), else
    the "(99.2G)" of older messages; NaN when the message gives neither."""
    for pattern in (r"Used ([\d.]+)G of", r"\(([\d.]+)G\)"):
        found = re.search(pattern, message)
        if found:
            return float(found.group(1)) * 1e9
    return float("nan")


def suggestions(cfg: TrainConfig, mesh_shape: dict[str, int]) -> list[str]:
    """What to change when the step does not fit, most effective first."""
    out = []
    if mesh_shape["fsdp"] < math.prod(mesh_shape.values()):
        out.append(
            "shard parameters and optimizer state over more devices: "
            "--config.mesh.shape=1,-1,1 (all FSDP)"
        )
    if cfg.model.remat != "full":
        out.append("recompute activations in the backward pass: --config.model.remat=full")
    micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
    if micro // batch_shards(cfg.mesh.rules, mesh_shape, micro) > 1:
        out.append(
            f"smaller micro-batches: --config.optim.grad_accum_steps="
            f"{cfg.optim.grad_accum_steps * 2}"
        )
    if cfg.model.param_dtype == "float32":
        out.append("store parameters in bfloat16: --config.model.param_dtype=bfloat16")
    return out


def have_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def render(result: dict[str, Any]) -> str:
    a = result["analytic"]
    gib = lambda b: f"{b / GiB:,.2f} GiB"  # noqa: E731
    lines = [
        f"plan for {a['target']}: {a['devices']} devices, mesh {a['mesh']}",
        f"  parameters            {a['params']:,}",
        f"  FLOPs / token         {a['flops_per_token']:.3e}",
        f"  FLOPs / step          {a['flops_per_step']:.3e}",
        f"  params / device       {gib(a['params_bytes_per_device'])}",
        f"  optimizer / device    {gib(a['optimizer_bytes_per_device'])}",
        f"  activations / device  {gib(a['activation_bytes_per_device_estimate'])} (estimate)",
        f"  gradients / device    {gib(a['gradient_bytes_per_device'])}",
        f"  total / device        {gib(a['total_bytes_per_device_estimate'])} (estimate) of "
        f"{gib(a['hbm_per_device'])} HBM",
        f"  step time @ {a['mfu']:.0%} MFU   {a['step_time_s']:.3f} s "
        f"({a['tokens_per_s']:,.0f} tokens/s)",
    ]
    if a.get("pipeline"):
        lines.insert(-1, f"  pipeline              {stages.describe(a['pipeline'])}")
    if a.get("experts"):
        lines.insert(-1, f"  experts               {experts.describe(a['experts'])}")
    if a.get("fp8"):
        f = a["fp8"]
        rate = (
            f"at {f['peak_per_device'] / 1e12:,.0f} TFLOP/s a device"
            if f["peak_per_device"]
            else "at the bf16 rate: no fp8 matrix units on this device"
        )
        lines.insert(-1, f"  fp8                   {f['share']:.0%} of the FLOPs in fp8, {rate}")
    if "choices" in result:
        lines.insert(1, "  choices: " + ", ".join(f"{k} {v}" for k, v in result["choices"].items()))
    c = result.get("compiled")
    if c:
        verdict = "fits" if c["fits"] else "DOES NOT FIT"
        lines += [
            f"  compiled for {c['compiled_devices']} x {c['device_kind']}: "
            f"{gib(c['total_bytes_per_device'])} per device of {gib(c['hbm_per_device'])}: "
            f"{verdict}",
        ]
        if c.get("compiler"):
            lines.append(f"  compiler: {c['compiler']}")
    elif result.get("note"):
        lines.append(f"  {result['note']}")
    for s in result.get("suggestions", []):
        lines.append(f"  suggestion: {s}")
    return "\n".join(lines)


def plan(cfg: TrainConfig, target: Target, mfu: float, compile_: bool | None) -> dict[str, Any]:
    """The analytic plan, plus the compiled one for TPUs when libtpu is available. The config's
    `platforms` entry for the target's devices is applied first, as `train` would there."""
    if not 0 < mfu <= 1:  # NaN too; 0 divided the step time by zero
        raise ConfigError(f"plan: --mfu {mfu}: give the share of peak assumed, in (0, 1].")
    platform = "tpu" if target.tpu_generation else "gpu"
    kind = f"TPU {target.tpu_generation}" if target.tpu_generation else target.name
    cfg = _accelerator_config(tune(cfg, platform, kind, target.num_devices))
    m = cfg.model
    kernel = memory.attention_kernel(cfg, platform)
    result: dict[str, Any] = {
        "analytic": analytic(cfg, target, mfu, kernel),
        "choices": {
            "platforms_entry": cfg.platform or "(none)",
            "attention": kernel,
            "remat": m.remat,
            "scan_layers": m.scan_layers,
            "micro_batches": cfg.optim.grad_accum_steps,
        },
    }
    fits = result["analytic"]["total_bytes_per_device_estimate"] <= target.hbm_per_device
    can_compile = bool(target.tpu_generation) and have_libtpu()
    if compile_ and not can_compile:
        raise ConfigError("--compile needs a TPU --topology and libtpu: pip install 'bigjax[tpu]'.")
    if can_compile and compile_ is not False:
        with progress.waiting(f"plan: compiling the train step for {target.name}"):
            result["compiled"] = compiled(cfg, target)
        fits = result["compiled"]["fits"]
    elif target.tpu_generation:
        result["note"] = (
            "not compiled (--no-compile); the memory above is the analytic estimate"
            if have_libtpu()
            else "install the tpu extra (libtpu) to compile the step for this topology"
        )
    if not fits:
        result["suggestions"] = suggestions(cfg, result["analytic"]["mesh"])
    return result
