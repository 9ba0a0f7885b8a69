"""The mesh a run gets: its config tuned for these devices (the `platforms` table), and the
device mesh ('data', 'stage', 'fsdp', 'context', 'tensor') built from its MeshConfig.

`for_run` is how every command (train, bench, plan, eval, serve) builds its mesh.

Per-platform tuning: a config file may carry the choices that are fastest on each kind of
device, e.g.

    c.platforms = dict(
        gpu=dict(model=dict(remat="none", scan_layers=False), micro_batch_per_device=8),
        tpu=dict(model=dict(remat="save_matmuls"), micro_batch_per_device=16),
        cpu=dict(model=dict(scan_layers=False)),
    )

Keys are a platform ('cpu', 'gpu', 'tpu') or a piece of a device kind ('H100', 'TPU v5p'),
case-insensitive; the longest device-kind match wins over the platform. An entry holds config
overrides and optionally `micro_batch_per_device`, which sets optim.grad_accum_steps so that
each device sees that many rows per micro-batch: the global batch (the experiment) stays as
configured and only how it is split over time changes with the hardware. Keys given on the
command line always win: `load_config` removes them from every entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from bigjax import platforms
from bigjax.config import (
    MESH_AXES,
    MICRO_BATCH,
    ConfigError,
    MeshConfig,
    TrainConfig,
    from_configdict,
    full_mesh_shape,
    merge_groups,
    to_dict,
)
from bigjax.errors import BigjaxWarning


def for_run(
    cfg: TrainConfig, devices: Sequence[jax.Device] | None = None
) -> tuple[TrainConfig, Mesh]:
    """The config tuned for these devices (its `platforms` entry) and its
    mesh over them: how every command (train, bench, plan, eval, serve) builds its mesh."""
    devices = list(jax.devices() if devices is None else devices)
    platforms.safe_compilation_cache(devices)
    cfg = for_devices(cfg, devices)
    return cfg, make_mesh(cfg.mesh, devices)


def for_devices(cfg: TrainConfig, devices: Sequence[jax.Device]) -> TrainConfig:
    """`tune` for these (jax) devices: their platform, kind and count."""
    first = devices[0]
    return tune(cfg, first.platform, first.device_kind, len(devices))


def select(table: Mapping[str, object], platform: str, device_kind: str) -> str:
    """The key of `table` that applies to these devices, or '' if none does."""
    kind = device_kind.lower()
    by_kind = [k for k in table if k.lower() not in ("cpu", "gpu", "tpu") and k.lower() in kind]
    if by_kind:
        return max(by_kind, key=len)
    return next((k for k in table if k.lower() == platform.lower()), "")


def tune(cfg: TrainConfig, platform: str, device_kind: str, num_devices: int) -> TrainConfig:
    """`cfg` with the entry of its `platforms` table for these devices applied (and the table
    replaced by the name of the entry used, so config.json says what ran)."""
    if not cfg.platforms:
        return cfg
    table = json.loads(cfg.platforms)
    key = select(table, platform, device_kind)
    raw = {**to_dict(cfg), "platforms": "", "platform": key}
    if not key:
        return from_configdict(raw)
    entry = dict(table[key])
    micro = entry.pop(MICRO_BATCH, 0)
    raw = merge_groups(raw, entry)
    if micro:
        raw["optim"]["grad_accum_steps"] = accumulation(raw, micro, num_devices)
    return from_configdict(raw)


def accumulation(raw: dict[str, Any], micro: int, num_devices: int) -> int:
    """Micro-batches per step so that each batch shard holds ~`micro` rows (at least one
    micro-batch; always a divisor of the batch that the shards divide)."""
    mesh = raw["mesh"]
    shape = list(full_mesh_shape(tuple(int(s) for s in mesh["shape"])))
    dcn = list(full_mesh_shape(tuple(int(s) for s in mesh.get("dcn_shape", (1,) * 3))))
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1) * math.prod(dcn)
        shape[shape.index(-1)] = max(num_devices // known, 1)
    sizes = {a: s * d for a, s, d in zip(MESH_AXES, shape, dcn, strict=True)}
    batch_axes = dict((k, tuple(v)) for k, v in raw["mesh"]["rules"].items())["act_batch"]
    shards = math.prod(sizes[a] for a in batch_axes)
    rows = raw["data"]["batch_size"]
    per_shard = max(rows // shards, 1)
    accum = max(per_shard // micro, 1)
    while rows % (accum * shards) and accum > 1:  # fewer, larger micro-batches until even
        accum -= 1
    return accum


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types over `devices` (default: all devices of all processes).

    With `cfg.dcn_shape` (multi-slice), each axis is laid out slice-major: its index is
    slice coordinate * per-slice size + coordinate inside the slice, so only the axes that
    `dcn_shape` spreads cross the slow data-center network.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    cfg = dataclasses.replace(
        cfg, shape=full_mesh_shape(cfg.shape), dcn_shape=full_mesh_shape(cfg.dcn_shape)
    )
    if math.prod(cfg.dcn_shape) == 1:
        shape = resolve_shape(cfg.shape, len(devices))
        return Mesh(device_grid(shape, devices), MESH_AXES, axis_types)
    groups = granules(devices)
    if len(groups) != math.prod(cfg.dcn_shape):
        raise ConfigError(
            f"mesh.dcn_shape: {tuple(cfg.dcn_shape)} needs {math.prod(cfg.dcn_shape)} slices, "
            f"found {len(groups)} (TPU slices, or processes where devices have no slice). "
            "Set it to the number of slices (e.g. 2,1,1), or 1,1,1 on one slice."
        )
    per_slice = resolve_shape(cfg.shape, len(groups[0]))
    return Mesh(hybrid_device_array(per_slice, cfg.dcn_shape, groups), MESH_AXES, axis_types)


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the single -1 in `shape` so the product is `num_devices`.

    Raises:
      ConfigError: if the shape cannot cover exactly `num_devices` devices.
    """
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"mesh.shape: {tuple(shape)} cannot be filled: {num_devices} devices are not "
                f"divisible by {known}. Pick sizes whose product divides {num_devices}."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"mesh.shape: {tuple(shape)} needs {math.prod(shape)} devices but "
            f"{num_devices} are present. Use -1 for one axis to fill the rest, or set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU."
        )
    return tuple(shape)


def granules(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """Devices grouped by TPU slice (`slice_index`), or by process where there is none
    (GPU hosts and CPU processes stand in for slices)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    by_slice = devices[0].platform == "tpu" or len(slices - {None}) > 1
    key = (lambda d: d.slice_index) if by_slice else (lambda d: d.process_index)
    groups: dict[int, list[jax.Device]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    return [groups[k] for k in sorted(groups)]


def hybrid_device_array(
    per_slice: Sequence[int], dcn_shape: Sequence[int], groups: Sequence[Sequence[jax.Device]]
) -> np.ndarray:
    """Device array of shape per_slice * dcn_shape: slice g (row-major over dcn_shape) fills
    the block at its dcn coordinates, laid out inside by the slice's physical topology."""
    if len({len(g) for g in groups}) != 1:
        raise ConfigError(
            f"mesh.dcn_shape: slices have unequal device counts {[len(g) for g in groups]}"
        )
    out = np.empty([i * d for i, d in zip(per_slice, dcn_shape, strict=True)], dtype=object)
    for group, coords in zip(groups, np.ndindex(*dcn_shape), strict=True):
        block = tuple(slice(c * i, (c + 1) * i) for c, i in zip(coords, per_slice, strict=True))
        out[block] = device_grid(per_slice, group)
    return out


def device_grid(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """`devices` (one slice) as an array of `shape`, laid over their physical topology.

    On a TPU torus each mesh axis is first sought as a product of whole physical axes (its
    rings then close over the wraparound links). Sizes that are not (data 2 x fsdp 32 on a
    4x4x4 v5p-128, context 8 there) are laid with physical axes split, as `jax.make_mesh`
    does on v5e: correct, but collectives along a split axis lose the wraparound links, so
    it is said once as a warning instead of refused. GPUs and CPUs have no torus: any shape.
    """
    try:
        return mesh_utils.create_device_mesh(shape, list(devices))
    except NotImplementedError:  # jax: no assignment of whole physical axes
        pass
    try:
        grid = mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True)
    except (NotImplementedError, ValueError) as e:
        raise ConfigError(
            f"mesh.shape: {_named(shape)} cannot be laid over {_torus(devices)} ({e}); use "
            "axis sizes that multiply its sides"
        ) from None
    warnings.warn(
        f"mesh.shape: {_named(shape)} is not made of whole axes of {_torus(devices)}: some "
        "mesh axes split a physical axis, so their collectives lose its wraparound links "
        "(slower rings); sizes that multiply whole sides avoid it.",
        category=BigjaxWarning,
        stacklevel=2,
    )
    return grid


def _named(shape: Sequence[int]) -> str:
    """The axes of `shape` other than 1, as 'data 2 x fsdp 32'."""
    return " x ".join(f"{a} {n}" for a, n in zip(MESH_AXES, shape, strict=True) if n > 1) or "1"


def _torus(devices: Sequence[jax.Device]) -> str:
    """'this slice's 4x4x4 TPU torus', from the chips' coordinates."""
    coords = np.array([getattr(d, "coords", ()) for d in devices])
    if coords.ndim != 2 or coords.shape[1] == 0:
        return f"these {len(devices)} devices"
    sides = "x".join(str(n) for n in coords.max(axis=0) - coords.min(axis=0) + 1)
    return f"this slice's {sides} TPU torus ({len(devices)} devices)"
