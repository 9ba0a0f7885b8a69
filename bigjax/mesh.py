"""Builds the device mesh ('data', 'stage', 'fsdp', 'context', 'tensor') from a MeshConfig."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from bigjax.config import MESH_AXES, ConfigError, MeshConfig, full_mesh_shape


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
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    groups = granules(devices)
    if len(groups) != math.prod(cfg.dcn_shape):
        raise ConfigError(
            f"mesh.dcn_shape: {tuple(cfg.dcn_shape)} needs {math.prod(cfg.dcn_shape)} slices, "
            f"found {len(groups)} (TPU slices, or processes where devices have no slice). "
            "Set it to the number of slices (e.g. 2,1,1), or 1,1,1 on one slice."
        )
    per_slice = resolve_shape(cfg.shape, len(groups[0]))
    return Mesh(hybrid_device_array(per_slice, cfg.dcn_shape, groups), MESH_AXES, axis_types)


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
        out[block] = mesh_utils.create_device_mesh(per_slice, list(group))
    return out
