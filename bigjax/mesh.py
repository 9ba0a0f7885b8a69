"""Builds the device mesh ('data', 'fsdp', 'tensor') from a MeshConfig."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from bigjax.config import MESH_AXES, ConfigError, MeshConfig


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
    """A mesh with Auto axis types over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(cfg.shape, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )
