"""What a checkpoint save costs the training loop of a real run: async vs synchronous.

    python scripts/bench/checkpoint_stall.py --config configs/lm_125m.py --out runs/bench_stall \\
        [--config.data.batch_size=4 ...]

The config's program, its Grain pipeline and `checkpoint.save` exactly as `bigjax train` uses
them, on this machine's devices (the config's `platforms` entry applied). Each mode trains
`--before` steps, saves, trains `--after` steps, and repeats that `--saves` times (the first
save creates the directories and is reported apart). Per save:
  blocked   the wall time of the `save` call (the loop waits for it);
  slowdown  how much longer the `--after` steps that follow took than as many undisturbed
            steps (the median step before the save times `--after`): the background write
            competing with training for host cores, memory bandwidth or PCIe.
Both as a share of the time of the `--after` steps. The modes alternate (async, sync, ...,
`--rounds` times), so drift of the machine spreads over both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import jax

from bigjax import checkpoint
from bigjax.config import load_config
from bigjax.mesh import for_devices, make_mesh
from bigjax.program import for_config


def measure(cfg, async_save: bool, directory: Path, args) -> list[dict]:
    shutil.rmtree(directory, ignore_errors=True)
    cfg = cfg.__class__(
        **{**cfg.__dict__, "checkpoint": cfg.checkpoint.__class__(
            **{**cfg.checkpoint.__dict__, "async_save": async_save, "keep": 2})}
    )  # fmt: skip
    mesh = make_mesh(cfg.mesh)
    saves = []
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        state = prog.init()
        data = prog.batches("train", seed=0)
        ckpt = checkpoint.Checkpointer(directory, cfg.checkpoint)
        step = prog.train_step.lower(state, prog.to_global(next(data))).compile()

        def timed_steps(n: int) -> list[float]:
            nonlocal state
            out = []
            for _ in range(n):
                start = time.perf_counter()
                state, m = step(state, prog.to_global(next(data)))
                jax.block_until_ready(m)
                out.append(time.perf_counter() - start)
            return out

        timed_steps(2)  # warm-up
        for i in range(args.saves):
            before = timed_steps(args.before)
            start = time.perf_counter()
            ckpt.save(state, data, {"bench": True}, force=True)
            blocked = time.perf_counter() - start
            after = timed_steps(args.after)
            base = statistics.median(before) * args.after
            saves.append(
                {
                    "first": i == 0,
                    "blocked_s": blocked,
                    "after_s": sum(after),
                    "undisturbed_s": base,
                    "step_s": statistics.median(before),
                }
            )
            mode = "async" if async_save else "sync "
            print(
                f"  {mode} save {i}: blocked {blocked:.3f} s, next {args.after} steps "
                f"{sum(after):.2f} s vs {base:.2f} s",
                flush=True,
            )
        ckpt.wait()
        ckpt.close()
        data.close()
    return saves


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/lm_125m.py")
    parser.add_argument("--out", default="runs/bench_stall")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--before", type=int, default=5)
    parser.add_argument("--after", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of async, sync")
    args, overrides = parser.parse_known_args()
    cfg = for_devices(load_config(args.config, overrides), jax.devices())
    out = Path(args.out)
    runs = {"async": [], "sync": []}
    for mode in ("async", "sync") * args.rounds:
        runs[mode] += measure(cfg, mode == "async", out / mode, args)
    summary = {}
    for mode, saves in runs.items():
        later = [s for s in saves if not s["first"]]
        blocked = statistics.median(s["blocked_s"] for s in later)
        after = statistics.median(s["undisturbed_s"] for s in later)
        slow = statistics.median(s["after_s"] - s["undisturbed_s"] for s in later)
        summary[mode] = {
            "blocked_s": blocked,
            "first_blocked_s": statistics.median(s["blocked_s"] for s in saves if s["first"]),
            "after_steps_s": after,
            "blocked_share": blocked / after,
            "slowdown_share": slow / after,
            "step_s": statistics.median(s["step_s"] for s in later),
        }
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "runs": runs, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"| mode | step | loop blocked per save | share of the next {args.after} steps | "
        "slowdown of those steps | first save |\n|---|---|---|---|---|---|"
    )
    for mode, s in summary.items():
        print(
            f"| {mode} | {s['step_s']:.3f} s | {s['blocked_s']:.3f} s | "
            f"{s['blocked_share']:.1%} | {s['slowdown_share']:+.1%} | "
            f"{s['first_blocked_s']:.3f} s |"
        )


if __name__ == "__main__":
    main()
