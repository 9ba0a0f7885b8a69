"""Mesh construction: -1 fill, device-count checks, Auto axis types."""

import math
import warnings

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


def _tpu_topology(name: str, slices: int = 1) -> list:
    """The devices of a TPU topology, compile-only (libtpu, no chips needed)."""
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    from jax.experimental import topologies

    from bigjax import platforms

    platforms.allow_compile_only_libtpu()
    return list(topologies.get_topology_desc(name, "tpu", num_slices=slices).devices)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "dcn_shape"),
    # a v5p-128 slice is a 4x4x4 torus: 32 and 8 are no products of its sides (jax's own
    # layout raised NotImplementedError, a traceback at `train` and `plan`); the second case
    # is a slice each of 2xv5p-128, the stages across them
    [((2, 1, 32, 1, 1, 1), (1, 1, 1, 1, 1, 1)), ((1, 1, 8, 8, 1, 1), (1, 2, 1, 1, 1, 1))],
)
def test_mesh_axes_that_split_a_torus_side_are_laid_out_with_a_warning(shape, dcn_shape):
    devices = _tpu_topology("v5p:4x4x4", math.prod(dcn_shape))
    with pytest.warns(UserWarning, match="split a physical axis"):
        mesh = make_mesh(MeshConfig(shape=shape, dcn_shape=dcn_shape), devices)
    want = [s * d for s, d in zip(shape, dcn_shape, strict=True)]
    assert list(mesh.shape.values()) == want
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    with warnings.catch_warnings():  # whole sides (4 x 16): laid as before, nothing said
        warnings.simplefilter("error")
        make_mesh(MeshConfig(shape=(1, 1, 16, 4, 1, 1)), devices[:64])


@pytest.mark.slow
def test_a_persistent_compilation_cache_on_cpu_devices_is_turned_off_not_deadlocked(tmp_path):
    # The second run of a (2, 2, 2) config on 8 CPU devices read its programs back from JAX's
    # cache, waited in an all-gather for 40 s, and XLA aborted it (exit 134).
    import os
    import subprocess

    from conftest import xla_flags
    from helpers import train_cmd

    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), **cache}
    flags = ["--config.num_steps=1", "--config.mesh.shape=(2,2,2)", "--config.eval.num_batches=1",
             "--config.metrics.plot=False", "--config.metrics.tensorboard=False"]  # fmt: skip

    def run(name):
        cmd = train_cmd(tmp_path / name, *flags)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    runs = [run("first"), run("second")]
    assert [r.returncode for r in runs] == [0, 0], runs[1].stderr[-2000:]
    for r in runs:
        assert "persistent compilation cache is off for this run: on 8 CPU devices" in r.stderr
