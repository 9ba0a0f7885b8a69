"""`bigjax bench`: the figures are consistent with each other and the CLI writes and compares."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from bigjax import bench, models

RUN = dict(capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)


@pytest.mark.slow
def test_bench_figures_are_consistent(tmp_path):
    cfg = tiny_config(mesh={"shape": (2, 4, 1)})
    r = bench.bench(cfg, bench.BenchSettings(warmup=1, steps=3, profile=str(tmp_path / "trace")))
    # the trace holds the profiled steps of the compiled train step (what XProf shows)
    (trace,) = (tmp_path / "trace").glob("plugins/profile/*/*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    steps = [e for e in events if e.get("ph") == "X" and "jit(train_step)" in e["name"]]
    assert len(steps) >= bench.PROFILED_STEPS
    assert len(r["loop_step_times_s"]) == 3 and len(r["device_step_times_s"]) == 3
    tokens = 16 * 64
    assert r["tokens_per_s"] == tokens / r["step_time_s"]
    flops = models.FLOPS_PER_TOKEN["llama"](cfg.model, 64) * tokens
    assert r["mfu"] == flops / r["step_time_s"] / r["peak_flops"]
    assert r["host_overhead_s"] == max(0.0, r["step_time_s"] - r["device_step_s"])  # never < 0
    assert 0 <= r["data_wait_s"] < r["step_time_s"] and r["compile_s"] > 0
    assert r["mesh"] == {"data": 2, "stage": 1, "fsdp": 4, "context": 1, "tensor": 1, "expert": 1}
    json.dumps(r)  # JSON-able as it is
    # compared with itself every ratio is exactly 1
    table = bench.render(r, baseline=r)
    assert table.count("1.000x vs baseline") == 6 and "tokens/s" in table


@pytest.mark.slow
def test_cli_bench_quick_writes_json_and_compares(tmp_path):
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "bigjax.cli", "bench", "--config", "configs/lm_tiny.py"]
    cmd += ["--config.data.seq_len=64", "--config.data.batch_size=8"]
    r = subprocess.run([*cmd, "--quick", "--json", str(out)], **RUN)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["settings"] == {"warmup": 1, "steps": 5, "profile": None}
    assert result["batch"] == [8, 64]
    assert "MFU" in r.stdout and "host overhead" in r.stdout
    # which speed choices it took, and from where: lm_tiny has no platforms table
    assert "choices: platforms_entry (none), attention einsum, remat none" in r.stdout
    assert result["choices"]["attention"] == "einsum"
    r = subprocess.run([*cmd, "--baseline", str(tmp_path / "missing.json")], **RUN)
    assert r.returncode == 2 and "--baseline: no such file" in r.stderr


@pytest.mark.slow
def test_cli_bench_prints_the_platform_entry_it_applied():
    cmd = [sys.executable, "-m", "bigjax.cli", "bench", "--config", "configs/lm_small.py"]
    cmd += ["--config.data.seq_len=32", "--config.data.batch_size=8", "--config.model.d_model=64"]
    cmd += ["--config.model.num_layers=2", "--steps", "1", "--warmup", "0"]
    r = subprocess.run(cmd, **RUN)
    assert r.returncode == 0, r.stderr[-2000:]
    # on this CPU, lm_small's `cpu` entry: unrolled layers
    assert "choices: platforms_entry cpu, attention einsum, remat none, scan_layers False" in (
        r.stdout
    )
