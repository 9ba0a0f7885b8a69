"""Mesh construction: -1 fill, device-count checks, Auto axis types."""

import jax
import pytest
from jax.sharding import AxisType

from bigjax.config import ConfigError, MeshConfig
from bigjax.mesh import make_mesh, resolve_shape


@pytest.mark.parametrize(
    "shape, n, expect",
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((-1, 1, 4), 8, (2, 1, 4)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((1, -1, 1), 1, (1, 1, 1)),
    ],
)
def test_resolve_shape(shape, n, expect):
    assert resolve_shape(shape, n) == expect


@pytest.mark.parametrize("shape, n", [((3, -1, 1), 8), ((2, 2, 1), 8), ((4, 4, 1), 8)])
def test_resolve_shape_errors(shape, n):
    with pytest.raises(ConfigError, match="mesh.shape"):
        resolve_shape(shape, n)


def test_make_mesh_uses_all_devices_with_auto_axes():
    mesh = make_mesh(MeshConfig(shape=(2, -1, 2)))
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "context": 1, "tensor": 2,
                                "expert": 1}  # fmt: skip
    assert mesh.devices.size == jax.device_count()
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_on_a_subset():
    assert make_mesh(MeshConfig(shape=(1, -1, 1)), jax.devices()[:4]).shape["fsdp"] == 4
