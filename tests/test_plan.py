"""`bigjax plan`: topology names, analytic memory against real shards, the TPU compile."""

import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import tiny_config

from bigjax import plan
from bigjax.config import ConfigError, MeshConfig
from bigjax.mesh import make_mesh
from bigjax.program import for_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, chips, shape",
    [
        ("v5p-128", 64, "4x4x4"),
        ("v4-32", 16, "2x2x4"),
        ("v5e-16", 16, "4x4"),
        ("v5litepod-8", 8, "2x4"),
        ("v6e-256", 256, "16x16"),
        ("v5p-8", 4, "2x2x1"),
        ("v5p-16", 8, "2x2x2"),
        ("v4-64", 32, "2x4x4"),
    ],
)
def test_parse_topology(name, chips, shape):
    t = plan.parse_topology(name)
    assert (t.num_devices, t.tpu_shape, t.num_slices) == (chips, shape, 1)
    many = plan.parse_topology(f"4x{name}")
    assert (many.num_devices, many.tpu_shape, many.num_slices) == (4 * chips, shape, 4)


@pytest.mark.parametrize("name", ["v5p", "tpu-8", "v5p-100", "v7x-8", "0xv5p-8", "2v5p-8"])
def test_bad_topology_names(name):
    with pytest.raises(ConfigError, match="topology"):
        plan.parse_topology(name)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_analytic_memory_equals_the_real_shards(shape):
    # The plan's per-device bytes come from the sharding rules alone; the real state on the
    # 8-device mesh must hold exactly that on each device.
    cfg = tiny_config(mesh={"shape": shape}, model={"vocab_size": 1024})
    target = plan.Target("8 cpu", 8, 1e12, 1e12)
    a = plan.analytic(cfg, target, mfu=0.5)
    mesh = make_mesh(MeshConfig(shape=shape, rules=cfg.mesh.rules))
    with jax.set_mesh(mesh):
        state = for_config(cfg, mesh).init()

    def on_device0(tree):
        return sum(
            s.data.nbytes
            for x in jax.tree.leaves(tree)
            for s in x.addressable_shards
            if s.device == jax.devices()[0]
        )

    assert a["params_bytes_per_device"] == on_device0(state.params)
    assert a["optimizer_bytes_per_device"] == on_device0(state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    if shape == (1, 8, 1):  # FSDP over all 8: about 1/8 each (norm scales are tiny)
        assert on_device0(state.params) == pytest.approx(total / 8, rel=0.01)


def test_flops_and_step_time():
    cfg = tiny_config()
    a = plan.analytic(cfg, plan.Target("x", 4, 1e12, 1e12), mfu=0.5)
    assert a["flops_per_step"] == a["flops_per_token"] * 16 * 64
    assert a["step_time_s"] == pytest.approx(a["flops_per_step"] / (4e12 * 0.5))


def test_does_not_fit_gives_suggestions():
    cfg = tiny_config(model={"vocab_size": 32000}, data={"batch_size": 64, "seq_len": 2048})
    result = plan.plan(cfg, plan.Target("tiny gpu", 2, 1 * plan.GiB, 1e12), 0.4, compile_=False)
    assert "model.remat=full" in " ".join(result["suggestions"])


def test_hbm_needed_is_read_from_the_compilers_own_total():
    # libtpu's message: the total first, then a breakdown with other "(...G)" figures (the
    # first of which plan once took for the total: 40 GiB "does not fit" of 95)
    message = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 96.10G of 95.74G hbm. Exceeded hbm capacity by 364.77M.\n\nTotal hbm usage "
        ">= 96.36G:\n    program          89.75G\n    HLO temp         89.36G (100.0% "
        "utilization: Unpadded (43.05G) Padded (43.05G), 51.8% fragmentation (46.31G))"
    )
    assert plan.hbm_needed(message) == 96.10e9
    assert plan.hbm_needed("RESOURCE_EXHAUSTED: temporaries (99.2G) over") == 99.2e9
    assert math.isnan(plan.hbm_needed("RESOURCE_EXHAUSTED: something else"))


def test_multi_slice_mesh_is_dcn_times_per_slice():
    cfg = tiny_config(mesh={"shape": (1, -1, 2), "dcn_shape": (2, 1, 1)})
    target = plan.parse_topology("2xv5p-16")  # 2 slices of 8 chips
    mesh = {"data": 2, "stage": 1, "fsdp": 4, "context": 1, "tensor": 2, "expert": 1}
    assert plan.analytic(cfg, target, 0.4)["mesh"] == mesh
    with pytest.raises(
        ConfigError, match=r"dcn_shape: \(2, 1, 1, 1, 1, 1\) spans 2 slices but v5p-16 has 1"
    ):
        plan.analytic(cfg, plan.parse_topology("v5p-16"), 0.4)


@pytest.mark.slow
def test_compiles_for_a_real_tpu_topology():
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    cfg = tiny_config()
    result = plan.plan(cfg, plan.parse_topology("v5p-8"), 0.4, compile_=None)
    c = result["compiled"]
    assert c["compiled_devices"] == 4 and "v5" in c["device_kind"].lower()
    assert c["fits"] and 0 < c["total_bytes_per_device"] < 95 * plan.GiB
    # two slices: the hybrid mesh puts `data` over DCN, built from the devices' slice_index
    two = tiny_config(mesh={"shape": (1, -1, 1), "dcn_shape": (2, 1, 1)})
    c = plan.plan(two, plan.parse_topology("2xv5p-8"), 0.4, compile_=None)["compiled"]
    assert c["compiled_devices"] == 8 and c["fits"]
    # far too big for a v5e chip's 16 GiB: compiled, judged, with suggestions
    big = tiny_config(model={"vocab_size": 131072}, data={"batch_size": 64, "seq_len": 4096})
    result = plan.plan(big, plan.parse_topology("v5e-4"), 0.4, compile_=None)
    assert not result["compiled"]["fits"] and result["suggestions"]
    # --no-compile with libtpu installed: says it was not asked for, not to install libtpu
    note = plan.plan(cfg, plan.parse_topology("v5p-8"), 0.4, compile_=False)["note"]
    assert "--no-compile" in note and "install" not in note


@pytest.mark.slow
def test_a_pipeline_keeps_its_per_tick_outputs_split_on_tpu():
    # XLA:TPU's own accounting, 2 stages x FSDP 4 on a v5p-16, 8 micro-batches (9 ticks).
    # Left to sharding propagation, the last stage's output kept per tick was whole on every
    # FSDP device (at 70 B, 36 GiB of a 96 GiB step): temporaries 2.44x the unpipelined
    # step's at the same micro-batch; split over the batch shards, 1.75x (the stages' inputs
    # kept per tick for the backward, which the flat step keeps once).
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    model = {"num_layers": 2, "d_model": 512, "d_ff": 1024, "num_heads": 4, "num_kv_heads": 4,
             "remat": "full"}  # fmt: skip

    def temp_bytes(mesh_shape, model, accum):
        cfg = tiny_config(
            model=model,
            data={"batch_size": 32, "seq_len": 2048},
            mesh={"shape": mesh_shape},
            optim={"warmup_steps": 2, "grad_accum_steps": accum},
        )
        return plan.plan(cfg, plan.parse_topology("v5p-16"), 0.4, compile_=True)["compiled"][
            "temp_bytes"
        ]

    flat = temp_bytes((1, 1, 8, 1, 1, 1), model, 4)  # micro-batches of 8 rows, as below
    piped = {**model, "pipeline_microbatches": 8}
    assert temp_bytes((1, 2, 4, 1, 1, 1), piped, 1) < 2.1 * flat


CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_compiles_for_a_v5p_8(name, tmp_path):
    # The abstract batch is the task's own (images, labels, token fields): every task plans.
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    import json

    from bigjax.config import to_dict
    from bigjax.config.load import load_config

    spec = str(ROOT / "configs" / name)
    if name == "finetune.py":  # starts from a run: any run directory's config.json
        (tmp_path / "config.json").write_text(json.dumps(to_dict(tiny_config())))
        spec += f":{tmp_path}"
    cfg = load_config(spec, [])
    slices = math.prod(cfg.mesh.dcn_shape)  # llama_70b: its pipeline stages across 2 slices
    topology = "v5p-8" if slices == 1 else f"{slices}xv5p-8"
    compiled = plan.plan(cfg, plan.parse_topology(topology), 0.4, compile_=True)["compiled"]
    assert compiled["compiled_devices"] == 4 * slices
    # compiled, and judged: it fits, or XLA's own out-of-memory answer says by how much
    assert compiled["fits"] or "RESOURCE_EXHAUSTED" in compiled["compiler"]
    assert compiled["total_bytes_per_device"] > 0


def test_cli_plan(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigjax.cli",
            "plan",
            "--config",
            "configs/llama_8b.py",
            "--topology",
            "v5p-128",
            "--no-compile",
            "--json",
            str(tmp_path / "p.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8,030,261,248" in r.stdout and "64 devices" in r.stdout
    assert (tmp_path / "p.json").exists()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigjax.cli",
            "plan",
            "--config",
            "configs/lm_tiny.py",
            "--topology",
            "v9-8",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 2 and "topology" in r.stderr


@pytest.mark.slow
def test_a_cpu_run_leaves_libtpu_alone_and_plan_compiles_beside_it(tmp_path):
    # With the tpu extra, every `bigjax train` on a machine without TPU chips used to start
    # libtpu and hold its lock file for its whole life, so plan's compile beside it failed.
    import os
    import signal

    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    from conftest import xla_flags
    from helpers import train_cmd

    from bigjax import platforms

    if platforms.has_tpu():
        pytest.skip("a machine with TPU chips: there, a run drives them and holds the lock")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # JAX picks
    env["XLA_FLAGS"] = xla_flags()
    run = tmp_path / "run"
    args = ["--config.data.seq_len=64", "--config.num_steps=300", "--config.metrics.log_every=1"]
    trainer = subprocess.Popen(train_cmd(run, *args), cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert trainer.stdout is not None  # its banner: JAX's backends are up
        assert trainer.stdout.readline().startswith("bigjax ")
        assert "libtpu" not in Path(f"/proc/{trainer.pid}/maps").read_text()
        assert trainer.pid not in platforms.lockfile_holders()
        trainer.send_signal(signal.SIGSTOP)  # alive and holding what it holds, not training
        r = subprocess.run(
            [sys.executable, "-m", "bigjax.cli", "plan", "--config", "configs/lm_tiny.py",
             "--topology", "v5e-4"], capture_output=True, text=True, cwd=ROOT, env=env,
            timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert "compiled for 4 x TPU v5 lite" in r.stdout
        assert trainer.poll() is None
    finally:
        trainer.kill()
        trainer.wait(timeout=300)


@pytest.mark.slow
def test_a_config_error_in_the_tpu_compile_is_one_line_without_libtpus_logs():
    # libtpu's start-up probing on a machine without chips logs ~6 lines ("Failed to find
    # host bounds", E0000 ...): held back, and no longer shown when the failure is the config
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    r = subprocess.run(
        [sys.executable, "-m", "bigjax.cli", "plan", "--config", "configs/lm_tiny.py",
         "--topology", "v5p-16", "--config.data.batch_size=4"],  # 4 rows, 8 FSDP shards
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("bigjax: error: data.batch_size: 4 sequences"), r.stderr
    assert [line for line in lines[:-1] if not line.startswith("plan: compiling")] == []


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["default", "fp8"])
def test_dropless_experts_in_pipeline_stages_compile_for_tpu(precision):
    # The pipeline's vmap over stages batched each expert's ragged_dot (and its gradients):
    # XLA:TPU compiles no ragged dot with batch dimensions ("Failed to create
    # RaggedConvSpec"), a traceback at plan and at train on TPUs. 2 stages x 2 experts.
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    model = {"num_layers": 2, "num_experts": 4, "moe_dispatch": "dropless",
             "matmul_precision": precision}  # fmt: skip
    cfg = tiny_config(model=model, data={"batch_size": 8}, mesh={"shape": (1, 2, 1, 1, 1, 2)})
    compiled = plan.plan(cfg, plan.parse_topology("v5p-8"), 0.4, compile_=True)["compiled"]
    assert compiled["compiled_devices"] == 4 and compiled["fits"]


@pytest.mark.slow
def test_a_v4_slice_compiles_one_device_per_chip():
    # A v4 VM runs one jax device per chip (megacore); libtpu's compile-only v4 topology
    # defaults to one per TensorCore, on which jax refuses to lay a mesh (an AssertionError
    # traceback at `plan --topology v4-16`).
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    compiled = plan.plan(tiny_config(), plan.parse_topology("v4-16"), 0.4, compile_=True)
    assert compiled["compiled"]["compiled_devices"] == 8 and compiled["compiled"]["fits"]


@pytest.mark.slow
@pytest.mark.parametrize("name, chips", [("v5e-1", 1), ("v6e-2", 2), ("2xv6e-1", 2)])
def test_a_slice_smaller_than_a_host_compiles(name, chips):
    # v5e-1, v6e-2: slices of 1 and 2 chips, which Cloud TPU sells; libtpu's default host of
    # 2x2 chips does not divide them (its "not divisible" traceback at `plan --topology v5e-1`)
    pytest.importorskip("libtpu", reason="needs the tpu extra: pip install 'bigjax[tpu]'")
    target = plan.parse_topology(name)
    cfg = tiny_config(mesh={"dcn_shape": (target.num_slices, 1, 1)})
    compiled = plan.plan(cfg, target, 0.4, compile_=True)
    assert compiled["compiled"]["compiled_devices"] == chips and compiled["compiled"]["fits"]


def test_an_empty_topology_is_a_bad_name_not_a_gpu_plan(capsys):
    from bigjax.cli.main import main

    assert main(["plan", "--config", str(ROOT / "configs" / "lm_tiny.py"), "--topology", ""]) == 2
    assert "--topology '': expected a Cloud TPU name" in capsys.readouterr().err
