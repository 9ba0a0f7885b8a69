"""Strict config conversion, CLI overrides and the exit-2 error contract."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from bigjax.cli import load_config
from bigjax.config import DEFAULT_RULES, MODEL_SIZES, ConfigError, from_configdict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_size_preset():
    cfg = from_configdict({"model": {"size": "1b", "num_layers": 3}})
    assert cfg.model.d_model == MODEL_SIZES["1b"]["d_model"]
    assert cfg.model.num_layers == 3  # an explicit key beats the preset
    assert cfg.optim.name == "adamw" and cfg.mesh.rules == DEFAULT_RULES


@pytest.mark.parametrize("text", ["1,8,1", "(1,8,1)", "[1, 8, 1]"])
def test_mesh_shape_strings(text):
    # three entries are (data, fsdp, tensor): stage and context are 1
    assert from_configdict({"mesh": {"shape": text}}).mesh.shape == (1, 1, 8, 1, 1, 1)


@pytest.mark.parametrize(
    "given, want",
    [
        ("data=2,fsdp=-1", (2, 1, -1, 1, 1, 1)),  # the command line's form
        ({"tensor": 2, "fsdp": -1}, (1, 1, -1, 1, 2, 1)),  # a config file's
        ({"expert": "4", "data": -1}, (-1, 1, 1, 1, 1, 4)),
    ],
)
def test_mesh_shape_by_axis_name(given, want):
    # the axes not named are 1: a run over more devices than the named sizes cover names -1
    assert from_configdict({"mesh": {"shape": given}}).mesh.shape == want
    dcn = from_configdict({"mesh": {"dcn_shape": "data=2"}}).mesh.dcn_shape
    assert dcn == (2, 1, 1, 1, 1, 1)  # slices: the same names


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"mesh": {"shape": {"tensr": 2}}}, r"mesh.shape axis: unknown value 'tensr'. Did you "
         r"mean 'tensor'\?"),
        ({"mesh": {"shape": "tensr=2"}}, r"Did you mean 'tensor'"),
        # a Python dict typed on the command line: which forms it takes, not "expected int"
        ({"mesh": {"shape": "{'data':3}"}}, r"mesh.shape: expected sizes by position like "
         r"1,1,-1,1,1,1 or by axis like data=2,fsdp=-1"),
        ({"mesh": {"shape": "data=two"}}, r"mesh.shape: expected sizes by position"),
        # ... and what was wrong with the entry: a huge number says so
        ({"mesh": {"shape": "data=" + "9" * 30}}, r"by axis like .*does not fit a 64-bit integer"),
        ({"model": 1}, r"^model: expected a group of keys, got 1; set them one by one "
         r"\(--config.model.KEY=VALUE\)"),
    ],
)  # fmt: skip
def test_mesh_shape_and_group_errors_say_which_forms_work(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_configdict(raw)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"optim.lrr.*Did you mean optim.lr\?"):
        from_configdict({"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"Did you mean 'cosine'"):
        from_configdict({"optim": {"schedule": "cosin"}})


VIT = {"model": {"family": "vit", "num_classes": 10},
       "data": {"task": "images", "images": "x", "seq_len": 65}}  # fmt: skip


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"optim": {"lr": "fast"}}, r"optim.lr: expected float"),
        ({"num_steps": 1.5}, r"num_steps: expected int"),
        # no setting means an infinity: inf trained to a NaN at step 1; 1e999 steps was an
        # OverflowError traceback
        ({"optim": {"lr": "inf"}}, r"optim.lr: expected a finite number, got inf"),
        ({"optim": {"lr": float("nan")}}, r"optim.lr: expected a finite number, got nan"),
        ({"num_steps": "1e999"}, r"num_steps: expected int, got '1e999'"),
        ({"model": {"d_model": 128, "num_heads": 3}}, r"model.num_heads: 3 heads do not divide"),
        ({"model": {"num_heads": 4, "num_kv_heads": 3}}, r"model.num_kv_heads"),
        ({"mesh": {"shape": (-1, -1, 1)}}, r"at most one -1"),
        ({"mesh": {"rules": {"embedd": "fsdp"}}}, r"Did you mean 'embed'"),
        ({"mesh": {"rules": {"embed": "fsdpp"}}}, r"unknown mesh axis 'fsdpp'"),
        ({"data": {"batch_size": 10}, "optim": {"grad_accum_steps": 4}}, r"not divisible"),
        # an OverflowError traceback deep in JAX (a sweep's seeds pass through here too)
        ({"seed": 2**70}, r"seed: 1180591620717411303424 does not fit a 64-bit integer"),
        ({"data": {"seed": str(-(2**64))}}, r"data.seed: -18446744073709551616 does not fit"),
        # each trained (or imported) a model whose every output was NaN
        ({"model": {"norm_eps": 0.0}}, r"model.norm_eps: must be positive"),
        ({"model": {"norm_eps": -1.0}}, r"model.norm_eps: must be positive"),
        ({"model": {"rope_theta": 0.0}}, r"model.rope_theta: must be > 1"),
        ({"model": {"rope_scaling": "llama3", "rope_low_freq_factor": 0.0}}, r"> 0"),
        (
            {"model": {"rope_scaling": "llama3", "rope_original_max_positions": 0}},
            r"model.rope_original_max_positions: llama3",
        ),  # fmt: skip
        # an int from a number in e-notation that is none: was truncated to 0 and 1
        ({"num_steps": "1e-30"}, r"num_steps: expected int, got '1e-30'"),
        ({"data": {"batch_size": "1.5e0"}}, r"data.batch_size: expected int, got '1.5e0'"),
        # each trained on without a word: a moment that never forgets (b = 1) or grows,
        # 0/0 for parameters with zero gradients (eps 0), growing weights, rewarded logits
        ({"optim": {"b1": 1.0}}, r"optim.b1: must be in \[0, 1\)"),
        ({"optim": {"name": "lion", "b2": -0.5}}, r"optim.b2: must be in \[0, 1\)"),
        ({"optim": {"name": "sgd", "momentum": 1.5}}, r"optim.momentum: must be in \[0, 1\)"),
        ({"optim": {"eps": 0.0}}, r"optim.eps: must be positive"),
        ({"optim": {"weight_decay": -0.1}}, r"optim.weight_decay: must be >= 0"),
        ({"optim": {"z_loss": -1e-4}}, r"optim.z_loss: must be >= 0"),
        # taken without a word as well: a negative peak was measured instead, and a choice
        # eval of 0 items logged no choice accuracy
        ({"metrics": {"peak_flops": -1.0}}, r"metrics.peak_flops: must be >= 0"),
        ({"eval": {"choices": "stdlib", "choice_items": 0}}, r"eval.choice_items: must be >= 1"),
        ({"eval": {"harness_tasks": "x", "harness_limit": -1.0}}, r"eval.harness_limit: must"),
        # a config file's odd shapes: each a TypeError traceback from inside the conversion
        ({1: 2}, r"config key 1 under the top level is not a name; keys are strings"),
        ({"data": {"mixture": 5}}, r"data.mixture: expected \{'dirA': 0.7"),
        ({"data": {"mixture": [1, 2]}}, r"data.mixture: expected .* got \[1, 2\]"),
        # one dataset twice, spelled two ways: two streams of the same records, taken silently
        ({"data": {"mixture": {"d/web": 1, "d/./web/": 2}}}, r"same dataset; .*\(d/web:3\)"),
        ({"data": {"mixture": "d/web:1,d/code:1,d/web:0.5"}}, r"'d/web' and 'd/web' are the"),
        ({"mesh": {"rules": 5}}, r"mesh.rules: expected \{'embed': 'fsdp', ...\}"),
        ({"mesh": {"rules": {5: "fsdp"}}}, r"mesh.rules: 5 is not a name"),
        # each a TypeError (a negative shape) or ZeroDivisionError traceback from the model
        ({"model": {"family": "gpt2", "head_dim": -1}}, r"model.head_dim: must be >= 0"),
        ({**VIT, "model": {**VIT["model"], "patch_size": 0}}, r"model.patch_size: must be pos"),
        ({**VIT, "model": {**VIT["model"], "channels": 0}}, r"model.channels: must be positive"),
    ],
)
def test_bad_values_name_the_key(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_configdict(raw)


def test_numpy_scalars_are_the_numbers_they_hold():
    # a config computed with NumPy (np.int64 steps from a token budget) was refused
    import numpy as np

    cfg = from_configdict({"num_steps": np.int64(7), "optim": {"lr": np.float32(0.5)},
                           "model": {"scan_layers": np.bool_(False)}})  # fmt: skip
    assert (cfg.num_steps, cfg.optim.lr, cfg.model.scan_layers) == (7, 0.5, False)
    assert type(cfg.num_steps) is int and type(cfg.optim.lr) is float
    with pytest.raises(ConfigError, match=r"num_steps: expected int, got float 7.5"):
        from_configdict({"num_steps": np.float64(7.5)})


@pytest.mark.parametrize(
    "raw, pattern",
    [  # Grain's shuffles take 32-bit seeds: each was Grain's ValueError at the first batch
        ({"seed": -1}, r"seed: -1 is not in 0 .. 2\*\*32 - 1"),
        ({"seed": 2**32}, r"seed: 4294967296 is not in 0 .. 2\*\*32 - 1"),
        ({"data": {"seed": -2}}, r"data.seed: -2 is not in .* \(or -1: the run's seed\)"),
    ],
)
def test_seeds_outside_32_bits_name_the_key(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_configdict(raw)
    from_configdict({"seed": 2**32 - 1, "data": {"seed": -1}})  # the ends of the range


def test_rules_override_merges_with_defaults():
    cfg = from_configdict({"mesh": {"rules": {"embed": None, "mlp": "fsdp+tensor"}}})
    rules = dict(cfg.mesh.rules)
    assert rules["embed"] == () and rules["mlp"] == ("fsdp", "tensor")
    assert rules["vocab"] == dict(DEFAULT_RULES)["vocab"]


def test_load_config_with_arg_and_overrides(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.num_steps = int(arg or 5)\n"
        "    c.model = dict(size='tiny')\n"
        "    return c\n"
    )
    cfg = load_config(
        f"{path}:7",
        [
            "--config.optim.lr=1e-3",
            "--config.mesh.shape=(2,2,2)",
            "--config.model.tie_embeddings=true",
        ],
    )
    assert cfg.num_steps == 7 and cfg.optim.lr == 1e-3 and cfg.mesh.shape == (2, 1, 2, 1, 2, 1)
    assert cfg.model.tie_embeddings is True


# finetune.py takes the run to start from (tested with one in test_hf.py)
SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "finetune.py")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert load_config(str(path), []).num_steps > 0  # validated: a broken config fails


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "bigjax.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_bad_config_exits_2_with_one_line():
    r = _cli(
        "train",
        "--config",
        "configs/lm_tiny.py",
        "--workdir",
        "/tmp/unused",
        "--config.optim.lrr=1",
    )
    assert r.returncode == 2
    assert "Did you mean optim.lr?" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_config_error_comes_before_jax_is_imported():
    # JAX and the libraries under it take seconds to import: a typo must not wait for them.
    code = (
        "import sys; from bigjax.cli.main import main; rc = main(['train', '--config', "
        "'configs/lm_tiny.py', '--workdir', '/tmp/unused', '--config.optim.lrr=1']); "
        "print(rc, sorted(m for m in ('jax', 'flax', 'orbax', 'grain') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "2 []", r.stdout + r.stderr
    assert "Did you mean optim.lr?" in r.stderr


def test_cli_mesh_mismatch_exits_2(tmp_path):
    r = _cli(
        "train",
        "--config",
        "configs/lm_tiny.py",
        "--workdir",
        str(tmp_path),
        "--config.mesh.shape=3,1,1",
    )
    assert r.returncode == 2 and "mesh.shape" in r.stderr and "Traceback" not in r.stderr


def test_cli_debug_shows_traceback():
    r = _cli(
        "--debug",
        "train",
        "--config",
        "configs/lm_tiny.py",
        "--workdir",
        "/tmp/unused",
        "--config.nope=1",
    )
    assert r.returncode == 2 and "Traceback" in r.stderr  # the same exit code as without


def test_cli_missing_config_file():
    r = _cli("train", "--config", "configs/nope.py", "--workdir", "/tmp/unused")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_tiny_config_helper_is_valid():
    assert tiny_config().model.d_model == 128


def test_every_config_key_is_documented():
    import dataclasses

    from bigjax.config import TrainConfig

    doc = (ROOT / "docs" / "configs.md").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default):
                yield from keys(type(f.default), f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    missing = [k for k in keys(TrainConfig) if f"`{k}`" not in doc]
    assert not missing, f"document these keys in docs/configs.md: {missing}"


def test_one_line_errors_are_classified_by_class_with_their_exit_codes():
    # main() reports these as one line with these exit codes because each class joins one of
    # the two kinds in bigjax.errors (by subclassing, not by name: a renamed or moved class
    # keeps its kind); anything else is a bug and keeps its traceback.
    from bigjax import checkpoint, errors, hf, loop, metrics, platforms, report, runlock, tensorfile
    from bigjax import config as cfg_module
    from bigjax.data import dataset, sources, tokenizer

    usage = [cfg_module.ConfigError, sources.DataError, tokenizer.TokenizerError,
             dataset.EmptySplitError, metrics.UnknownDeviceError, report.ReportError,
             hf.ConvertError, tensorfile.TensorFileError, runlock.LockFileError,
             checkpoint.CheckpointMismatch, FileNotFoundError]  # fmt: skip
    failed = [checkpoint.CheckpointError, loop.NonFiniteError, metrics.WriteError,
              platforms.DeviceBusyError]  # fmt: skip
    assert [errors.exit_code(cls("x")) for cls in usage] == [2] * len(usage)
    assert [errors.exit_code(cls("x")) for cls in failed] == [1] * len(failed)
    assert errors.exit_code(ValueError("x")) is None and errors.exit_code(KeyError("x")) is None


def test_a_warmup_longer_than_the_run_is_a_warning_not_an_error():
    from bigjax.config import advice

    assert advice(tiny_config()) == []
    (line,) = advice(tiny_config(num_steps=5, optim={"warmup_steps": 10}))
    assert "optim.warmup_steps=10 is more than num_steps=5" in line
