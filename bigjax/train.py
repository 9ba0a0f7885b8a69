"""train(cfg, workdir): the one function that wires config, mesh, model, data and loop together."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax

import bigjax
from bigjax import checkpoint, metrics, models
from bigjax.config import ConfigError, TrainConfig, to_dict
from bigjax.data import pipeline
from bigjax.mesh import make_mesh
from bigjax.program import Program, make_program


def run_eval(prog: Program, params: Any) -> dict[str, float]:
    """Loss and perplexity over the first `eval.num_batches` batches of the held-out split,
    read in a fixed order so every eval of every run sees the same tokens."""
    cfg = prog.cfg
    it = iter(pipeline.for_config(cfg.data, split="validation", seed=0, shuffle=False, workers=0))
    nll, weight = 0.0, 0.0
    for local in pipeline.take(it, cfg.eval.num_batches):
        out = jax.device_get(prog.eval_step(params, prog.to_global(local)))
        nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight_sum"])
    getattr(it, "close", lambda: None)()
    loss = nll / max(weight, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def train(cfg: TrainConfig, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    workdir = Path(workdir)
    writer_process = jax.process_index() == 0
    if writer_process:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    tokenizer = pipeline.tokenizer_for(cfg.data)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.kind} "
            f"tokenizer's {tokenizer.vocab_size} tokens; set it to at least that."
        )

    # Measured before the mesh is set: on CPU it runs a matmul on one device.
    peak = metrics.total_peak_flops(jax.devices(), cfg.metrics.peak_flops)

    with jax.set_mesh(mesh):
        prog = make_program(cfg, mesh)
        data_iter = iter(pipeline.for_config(cfg.data, split="train", seed=cfg.seed))

        manager = checkpoint.make_manager(workdir / "checkpoints", cfg.checkpoint)
        target = checkpoint.restore_target(prog.abstract, prog.shardings)
        state = checkpoint.restore_latest(manager, target, data_iter)
        resumed = state is not None
        if state is None:
            state = prog.init()
        start = int(jax.device_get(state.step))

        num_params = models.count_params(prog.graph_state)
        meta = {
            "bigjax_version": bigjax.__version__,
            "config": to_dict(cfg),
            "mesh": dict(mesh.shape),
            "num_params": num_params,
            "params": {
                "/".join(map(str, path)): list(leaf.shape)
                for path, leaf in jax.tree_util.tree_leaves_with_path(prog.abstract.params)
            },
        }
        writers = metrics.Writers(
            workdir, enabled=writer_process, tensorboard=cfg.metrics.tensorboard
        )
        if writer_process:
            (workdir / "config.json").write_text(json.dumps(meta["config"], indent=2) + "\n")
            writers.truncate_after(start)
            print(
                f"bigjax {bigjax.__version__}: {num_params:,} parameters, mesh "
                f"{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
                f"devices; {'resuming from step ' + str(start) if resumed else 'fresh start'}",
                flush=True,
            )

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops_per_step = (
            models.FLOPS_PER_TOKEN[cfg.model.family](cfg.model, cfg.data.seq_len) * tokens_per_step
        )

        def evaluate(at_step: int) -> dict[str, float]:
            row = {"step": at_step, **run_eval(prog, state.params)}
            writers.write(
                row, f"eval @ {at_step}: loss {row['eval_loss']:.4f}, ppl {row['eval_ppl']:.2f}"
            )
            return row

        last: dict[str, Any] = {}
        clock = {
            "start": time.perf_counter(),
            "steps": 0,
            "tokens": 0.0,
            "compile_s": None,
            "data_wait": 0.0,
        }

        def log_step(done_step: int, device_metrics: dict[str, jax.Array]) -> None:
            """Host side of one finished step: throughput window, logging."""
            nonlocal last
            host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            clock["steps"] += 1
            clock["tokens"] += host.pop("tokens")
            first = clock["compile_s"] is None
            if first:  # includes compilation: logged, but kept out of the throughput window
                clock["compile_s"] = time.perf_counter() - clock["start"]
            if done_step % cfg.metrics.log_every == 0 or done_step == cfg.num_steps or first:
                elapsed = time.perf_counter() - clock["start"]
                step_time = None if first else elapsed / clock["steps"]
                last = {
                    "step": done_step,
                    **host,
                    "tokens_per_sec": None if first else clock["tokens"] / elapsed,
                    "step_time": step_time,
                    "mfu": None if first else flops_per_step / step_time / peak,
                    "eta_s": None if first else step_time * (cfg.num_steps - done_step),
                    # host time blocked on the input pipeline, per step and as a share
                    "data_wait_s": clock["data_wait"] / clock["steps"],
                    "data_wait_frac": None if first else clock["data_wait"] / elapsed,
                    "compile_s": clock["compile_s"],
                }
                writers.write(last, metrics.progress_line(last, cfg.num_steps))
                clock.update(start=time.perf_counter(), steps=0, tokens=0.0, data_wait=0.0)

        pending = None  # the step dispatched before this one: (step, metrics on device)
        saved_step = start if resumed else -1
        last_eval: dict[str, float] = {}
        for step_index in range(start, cfg.num_steps):
            wait_start = time.perf_counter()
            local_batch = next(data_iter)
            clock["data_wait"] += time.perf_counter() - wait_start
            state, step_metrics = prog.train_step(state, prog.to_global(local_batch))
            # Fetch the previous step's metrics only now: the device already has this step.
            if pending is not None:
                log_step(*pending)
            current = step_index + 1
            pending = (current, step_metrics)
            every = cfg.eval.every_steps
            eval_due = current == cfg.num_steps or (every and current % every == 0)
            if eval_due:  # log this step first, keeping rows in step order; eval syncs anyway
                log_step(*pending)
                pending = None
            if cfg.checkpoint.every_steps and current % cfg.checkpoint.every_steps == 0:
                saved_step = current if checkpoint.save(manager, state, data_iter, meta) else -1
            if eval_due:
                last_eval = evaluate(current)

        final_step = int(jax.device_get(state.step))
        if saved_step != final_step:
            checkpoint.save(manager, state, data_iter, meta, force=True)
        manager.wait_until_finished()
        manager.close()
        getattr(data_iter, "close", lambda: None)()
        writers.close()

    if writer_process:
        if cfg.metrics.plot and writers.path.exists():
            metrics.plot_loss(writers.path, workdir / "loss.png")
        print(
            f"done: step {final_step}"
            + (f", eval loss {last_eval['eval_loss']:.4f}" if last_eval else " (already complete)")
            + ".\n"
            f"  metrics:     {workdir / 'metrics.jsonl'}\n"
            f"  plot:        {workdir / 'loss.png'}\n"
            f"  tensorboard: {workdir / 'tensorboard'}\n"
            f"  checkpoints: {workdir / 'checkpoints'}",
            flush=True,
        )
    return {**last, **last_eval}
