"""Data benchmark: `prepare` throughput, pipeline tokens/s, and data wait inside training.

    python scripts/bench/data_pipeline.py --out runs/bench_data

Prints a table and writes results.json. Each figure is the median of --reps runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bigjax.config import DataConfig
from bigjax.data import dataset, pipeline
from bigjax.data.dataset import read_manifest
from bigjax.metrics import read_jsonl


def bench_prepare(out: Path, tokenizer: str, reps: int) -> dict:
    times, manifest = [], None
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bigjax.cli",
                "prepare",
                "--input",
                "stdlib",
                "--output",
                str(out),
                "--tokenizer",
                tokenizer,
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - start)
        manifest = read_manifest(out)
    wall = statistics.median(times)
    return {
        "tokenizer": tokenizer,
        "mb_in": manifest["bytes_in"] / 1e6,
        "wall_s": wall,
        "mb_per_s": manifest["bytes_in"] / 1e6 / wall,
        "tokens": manifest["tokens_out"],
    }


def bench_pipeline(ds: Path, batch: int, seq_len: int, workers: int, steps: int) -> dict:
    cfg = DataConfig(path=str(ds), batch_size=batch, seq_len=seq_len, num_workers=workers)
    it = iter(pipeline.for_config(cfg, split="train", seed=0, tokenizer=dataset.tokenizer_for(cfg)))
    pipeline.take(it, 5)  # workers up, buffers full
    start = time.perf_counter()
    pipeline.take(it, steps)
    elapsed = time.perf_counter() - start
    getattr(it, "close", lambda: None)()
    return {"workers": workers, "tokens_per_s": steps * batch * seq_len / elapsed}


def bench_training(ds: Path, run: Path, steps: int, workers: int) -> dict:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bigjax.cli",
            "train",
            "--config",
            "configs/lm_small.py",
            "--workdir",
            str(run),
            f"--config.data.path={ds}",
            f"--config.num_steps={steps}",
            f"--config.data.num_workers={workers}",
            "--config.metrics.log_every=5",
            "--config.checkpoint.every_steps=0",
            "--config.eval.num_batches=1",
            "--config.metrics.plot=false",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("step_time")]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_sec"] for r in rows),
        "step_time_s": statistics.median(r["step_time"] for r in rows),
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench_data")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=25)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = out / "stdlib_byte"
    results = {
        "machine": f"{os.cpu_count()} CPUs",
        "prepare": [
            bench_prepare(ds, "byte", args.reps),
            bench_prepare(out / "stdlib_bpe", "bpe:32000", 1),
        ],
    }
    results["pipeline"] = [bench_pipeline(ds, 8, 256, w, 200) for w in (0, 2)]
    results["training_lm_small"] = bench_training(ds, out / "train", args.train_steps, 2)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| measure | value |\n|---|---|")
    for p in results["prepare"]:
        print(
            f"| prepare stdlib, all stages, {p['tokenizer']} | {p['mb_per_s']:.2f} MB/s "
            f"({p['mb_in']:.1f} MB in {p['wall_s']:.1f} s) |"
        )
    for p in results["pipeline"]:
        print(
            f"| pipeline, lm_small batches, {p['workers']} workers | "
            f"{p['tokens_per_s']:,.0f} tokens/s |"
        )
    t = results["training_lm_small"]
    print(
        f"| lm_small training consumes | {t['tokens_per_s']:,.0f} tokens/s "
        f"({t['step_time_s']:.3f} s/step) |"
    )
    print(f"| data wait in training (2 workers) | {t['data_wait_frac']:.2%} of step time |")


if __name__ == "__main__":
    main()
