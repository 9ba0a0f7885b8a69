"""Test setup: 8 fake CPU devices, forced before JAX initialises its backends."""

import gc
import os
import re
import subprocess
import sys

# Tests compile far more than they run (a few steps of a tiny model per program), so XLA's
# CPU backend compiles at LLVM optimisation level 0: a 2-step `bigjax train` takes 9.6 instead
# of 12.8 CPU-seconds. The numbers do not change (test_step's golden losses are bitwise the
# same at either level); steps run ~1.7x slower, which only a benchmark would notice. Eigen's
# thread pool (tiny matmuls gain nothing from it, its idle threads spin) and LLVM's expensive
# passes off too: test_step plus a resume test 101.5 -> 90.8 CPU-seconds, golden losses equal.
# XLA:CPU's newer fusion emitters off as well (the classic elemental emitter compiles faster;
# steps run ~1.25x slower): test_reliability + test_integrity + test_step 387.6 -> 275.8
# CPU-seconds, test_moe 108.4 -> 59.2, golden losses bitwise equal (docs/benchmarks.md).
_FAST_COMPILE_FLAGS = [
    "--xla_backend_optimization_level=0",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
]


def _known_to_xla(flags: list[str]) -> list[str]:
    """`flags` less those this jaxlib does not know: XLA aborts a process on an unknown flag
    (these are debug options, and a jaxlib may drop one), so one probe process names them."""
    probe = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]
    for _ in flags:
        env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
        err = subprocess.run(probe, env=env, capture_output=True, text=True).stderr
        unknown = re.findall(r"Unknown flags? in XLA_FLAGS: (.*)", err)
        if not unknown:
            return flags
        flags = [f for f in flags if f not in unknown[0].split()]
    return flags


FAST_COMPILE = " ".join(_known_to_xla(_FAST_COMPILE_FLAGS))


def xla_flags(devices: int = 8) -> str:
    """XLA_FLAGS for the tests and the processes they start: `devices` fake CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


# Must run before `import jax` anywhere: XLA reads the flags once, at backend start.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags()).strip()
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


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Frees each test module's compiled programs when it ends. Every XLA:CPU executable maps
    its code into the process; held for the whole session (jit caches, helpers' shared
    programs), the suite's thousands of them reached the kernel's limit on memory maps
    (vm.max_map_count, 65530 here: 10,889 maps after test_parallelism.py alone), and XLA then
    crashed with a segmentation fault inside a later compile."""
    yield
    from helpers import _program

    _program.cache_clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained tiny run (2 steps, context 128) that the serving and harness tests share."""
    from bigjax.train import train

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = tiny_config(num_steps=2, data={"batch_size": 8, "seq_len": 128},
                      checkpoint={"every_steps": 2})  # fmt: skip
    train(cfg, run)
    return run
