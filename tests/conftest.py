"""Test setup: 8 fake CPU devices, forced before JAX initialises its backends."""

import os

# Must run before `import jax` anywhere: XLA reads the flag once, at backend start.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from bigjax.config import TrainConfig, from_configdict  # noqa: E402


def tiny_config(**groups) -> TrainConfig:
    """lm_tiny-like config for tests; `groups` override whole sections, e.g. model={...}."""
    raw = {
        "num_steps": 10,
        "model": {"size": "tiny"},
        "optim": {"warmup_steps": 2},
        "data": {"batch_size": 16, "seq_len": 64},
        "metrics": {"log_every": 1, "tensorboard": False, "plot": False},
        "eval": {"num_batches": 1},
    }
    for key, value in groups.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return from_configdict(raw)


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "tests need 8 fake CPU devices (XLA_FLAGS set too late?)"
