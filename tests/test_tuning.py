"""Per-platform tuning: the `platforms` table of a config, applied for the devices at hand."""

import json
from pathlib import Path

import jax
import pytest

from bigjax.cli import load_config
from bigjax.config import ConfigError, from_configdict
from bigjax.mesh import for_devices, select, tune

ROOT = Path(__file__).resolve().parents[1]
TABLE = {
    "gpu": {"model": {"remat": "none", "scan_layers": False}, "micro_batch_per_device": 8},
    "H100": {"model": {"remat": "full"}},
    "tpu": {"model": {"remat": "save_matmuls"}},
}


def _cfg(**extra):
    return from_configdict({"data": {"batch_size": 64, "seq_len": 64}, "platforms": TABLE, **extra})


def test_device_kind_beats_platform_and_none_applies_elsewhere():
    assert select(TABLE, "gpu", "NVIDIA H100 80GB HBM3") == "H100"
    assert select(TABLE, "gpu", "NVIDIA H200") == "gpu"
    assert select(TABLE, "tpu", "TPU v5p") == "tpu"
    assert select(TABLE, "cpu", "cpu") == ""
    cpu = tune(_cfg(), "cpu", "cpu", 8)
    assert (cpu.platform, cpu.platforms, cpu.model.remat) == ("", "", "none")
    assert cpu.model.scan_layers  # untouched


@pytest.mark.parametrize(
    ("devices", "mesh", "accum"),
    [
        (1, (1, -1, 1), 8),  # 64 rows on one device: 8 micro-batches of 8
        (8, (1, -1, 1), 1),  # 8 rows per device already
        (4, (2, 2, 1), 2),  # 16 rows per batch shard
        (8, (1, 2, 4), 4),  # tensor-parallel devices share rows: 32 per shard
    ],
)
def test_micro_batch_per_device_sets_accumulation(devices, mesh, accum):
    cfg = tune(_cfg(mesh={"shape": mesh}), "gpu", "NVIDIA H200", devices)
    assert cfg.platform == "gpu" and cfg.model.remat == "none" and not cfg.model.scan_layers
    assert cfg.optim.grad_accum_steps == accum
    assert cfg.data.batch_size == 64  # the experiment is unchanged


def test_command_line_wins_over_every_entry(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        f"    c.platforms = {TABLE!r}\n"
        "    return c\n"
    )
    cfg = load_config(str(path), ["--config.model.remat=full", "--config.optim.grad_accum_steps=2"])
    on_gpu = tune(cfg, "gpu", "NVIDIA H200", 1)
    assert on_gpu.model.remat == "full" and on_gpu.optim.grad_accum_steps == 2
    assert not on_gpu.model.scan_layers  # what the user did not set still comes from the entry


def test_a_bad_entry_fails_at_load_on_any_machine():
    with pytest.raises(ConfigError, match="platforms.tpu: .*model.remat.*Did you mean"):
        from_configdict({"platforms": {"tpu": {"model": {"remat": "nonee"}}}})
    with pytest.raises(ConfigError, match="platforms.gpu: unknown config key 'modle'"):
        from_configdict({"platforms": {"gpu": {"modle": {}}}})
    with pytest.raises(ConfigError, match="micro_batch_per_device: expected a positive int"):
        from_configdict({"platforms": {"gpu": {"micro_batch_per_device": 0}}})


@pytest.mark.parametrize("text", ["abc", "0", "None", "[1, 2]", "{'gpu': {}}"])
def test_a_table_given_as_text_that_is_no_json_table_fails_at_load(text):
    # --config.platforms=abc was taken and failed when the devices were known, as a
    # JSONDecodeError (or TypeError) traceback from inside the mesh's tuning
    with pytest.raises(ConfigError, match=r"platforms: expected a table of entries as JSON"):
        load_config(str(ROOT / "configs" / "lm_tiny.py"), [f"--config.platforms={text}"])


def test_a_table_given_as_json_text_is_checked_and_applied():
    spec = str(ROOT / "configs" / "lm_tiny.py")
    cfg = load_config(spec, ['--config.platforms={"cpu": {"data": {"batch_size": 8}}}'])
    assert tune(cfg, "cpu", "cpu", 8).data.batch_size == 8
    assert from_configdict(json.loads(json.dumps({"platforms": cfg.platforms}))) is not None
    with pytest.raises(ConfigError, match="platforms.cpu: .*model.remat.*Did you mean"):
        load_config(spec, ['--config.platforms={"cpu": {"model": {"remat": "nonee"}}}'])


TUNED = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if "platforms" in p.read_text())


def test_the_tuned_configs_are_found():
    assert {"llama_1b", "llama_8b", "lm_small", "lm_125m", "qwen3_moe"} <= set(TUNED)


@pytest.mark.parametrize("name", TUNED)
def test_shipped_configs_tune_on_every_platform(name):
    cfg = load_config(str(ROOT / "configs" / f"{name}.py"), [])
    assert cfg.model.attention == "auto"  # the kernel follows the device, never hard-coded
    for platform, kind, n in (("gpu", "NVIDIA H200", 1), ("tpu", "TPU v5p", 64), ("cpu", "cpu", 1)):
        tuned = tune(cfg, platform, kind, n)
        assert cfg.data.batch_size % tuned.optim.grad_accum_steps == 0
        assert json.loads(cfg.platforms).get(tuned.platform, {}) is not None


def test_the_moe_config_takes_the_capacity_dispatch_on_gpus():
    # Measured on an H200: the dropless scan of small kernels 299 ms a layer, capacity 7.2 ms;
    # TPUs keep dropless (ragged_dot) as the config says.
    cfg = load_config(str(ROOT / "configs" / "qwen3_moe.py"), [])
    assert tune(cfg, "gpu", "NVIDIA H200", 8).model.moe_dispatch == "capacity"
    assert tune(cfg, "tpu", "TPU v5p", 64).model.moe_dispatch == "dropless"


def test_tuning_here_records_the_entry(tmp_path):
    cfg = for_devices(load_config(str(ROOT / "configs" / "lm_small.py"), []), jax.devices())
    assert cfg.platform == "cpu" and not cfg.model.scan_layers
