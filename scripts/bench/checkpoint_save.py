"""How long a checkpoint save blocks the training loop: async vs synchronous Orbax saves.

    python scripts/bench/checkpoint_save.py --out runs/bench_ckpt

A ~200 MB train state (16.8 M params + two Adam moments, f32) on one CPU device. Each mode
saves `--saves` times (the first save is reported apart: it creates directories and warms
up). Blocking = wall time of the `save` call, i.e. what the training loop waits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import jax

from bigjax import checkpoint
from bigjax.config import CheckpointConfig, from_configdict
from bigjax.mesh import make_mesh
from bigjax.program import for_config


def measure(cfg, async_save: bool, directory: Path, saves: int) -> dict:
    shutil.rmtree(directory, ignore_errors=True)
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        state = prog.init()
        ckpt_cfg = CheckpointConfig(every_steps=1, keep=2, async_save=async_save)
        manager = checkpoint.Checkpointer(directory, ckpt_cfg).manager
        blocked = []
        for _ in range(saves):
            state = state.replace(step=state.step + 1)
            jax.block_until_ready(state)
            start = time.perf_counter()
            manager.save(int(state.step), args=_args(state), force=True)
            blocked.append(time.perf_counter() - start)
            time.sleep(1.0 if async_save else 0.0)  # a training step's worth of time
        start = time.perf_counter()
        manager.wait_until_finished()
        drain = time.perf_counter() - start
        manager.close()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return {
        "async": async_save,
        "state_mb": nbytes / 1e6,
        "first_s": blocked[0],
        "median_s": statistics.median(blocked[1:]),
        "drain_s": drain,
    }


def _args(state):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardSave(state))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench_ckpt")
    parser.add_argument("--saves", type=int, default=6)
    args = parser.parse_args()
    out = Path(args.out)
    cfg = from_configdict(
        {
            "mesh": {"shape": (1, 1, 1)},
            "model": {
                "d_model": 512,
                "num_layers": 2,
                "num_heads": 8,
                "d_ff": 2048,
                "vocab_size": 8192,
            },
            "data": {"batch_size": 8, "seq_len": 128},
        }
    )
    results = [measure(cfg, a, out / f"async_{a}", args.saves) for a in (True, False, True, False)]
    by_mode = {}
    for r in results:
        by_mode.setdefault(r["async"], []).append(r)
    summary = {
        ("async" if a else "sync"): {
            "state_mb": rs[0]["state_mb"],
            "median_blocking_s": statistics.median(r["median_s"] for r in rs),
            "first_save_s": statistics.median(r["first_s"] for r in rs),
        }
        for a, rs in by_mode.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    print("| mode | state | loop blocked per save (median) | first save |\n|---|---|---|---|")
    for mode, s in summary.items():
        print(
            f"| {mode} | {s['state_mb']:.0f} MB | {s['median_blocking_s']:.3f} s | "
            f"{s['first_save_s']:.3f} s |"
        )
    ratio = summary["sync"]["median_blocking_s"] / summary["async"]["median_blocking_s"]
    print(f"async blocks the loop {ratio:.1f}x less than a synchronous save")


if __name__ == "__main__":
    main()
