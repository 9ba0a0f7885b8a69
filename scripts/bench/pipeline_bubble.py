"""The pipeline bubble, formula beside measurement, on 8 fake CPU devices.

Every tick of bigjax's schedule runs all stages (bubble ticks compute on stand-in data that is
then dropped), so on one CPU core, where the devices' work runs one after another, a step's
time is proportional to the stage-ticks it executes: S (V M + S - 1) chunk-visits for the V M S
useful ones. The measured bubble is therefore 1 - t(no stages) / t(S stages): the share of
executed work that is bubble, which on real stages (running side by side) is the share of
each stage's time it idles. Each configuration is `bigjax bench --quick` in its own process,
pinned to core 0 (`taskset -c 0`); the same model (lm_tiny at 8 layers, d_model 256) and
global batch throughout.

    python scripts/bench/pipeline_bubble.py [--reps 1]   (about a minute a case and rep)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (stages, micro-batches, laps); stages 1 is the reference (no pipeline)
CASES = [(1, 1, 1), (2, 2, 1), (2, 8, 1), (4, 4, 1), (4, 4, 2)]


def step_time(stages: int, micro: int, laps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            "taskset", "-c", "0", sys.executable, "-m", "bigjax.cli", "bench",
            "--config", "configs/lm_tiny.py", "--quick", "--json", str(out),
            "--config.model.num_layers=8", "--config.model.d_model=256",
            "--config.model.d_ff=768", "--config.data.batch_size=32",
            f"--config.mesh.shape=1,{stages},-1,1,1",
            f"--config.model.pipeline_microbatches={micro}",
            f"--config.model.pipeline_interleave={laps}",
        ]  # fmt: skip
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
               "JAX_PLATFORMS": "cpu"}  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        return float(json.loads(out.read_text())["device_step_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    times: dict[tuple[int, int, int], list[float]] = {c: [] for c in CASES}
    for _ in range(args.reps):  # alternate, so drift spreads over every case
        for case in CASES:
            times[case].append(step_time(*case))
    base = statistics.median(times[CASES[0]])
    print("| stages | micro-batches | interleave | step (median) | bubble: formula | measured |")
    print("|---|---|---|---|---|---|")
    for s, m, v in CASES:
        t = statistics.median(times[(s, m, v)])
        formula = (s - 1) / (v * m + s - 1)
        measured = 1 - base / t
        print(f"| {s} | {m} | {v} | {t * 1e3:.0f} ms | {formula:.1%} | {measured:.1%} |")


if __name__ == "__main__":
    main()
