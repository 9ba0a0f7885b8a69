"""train(cfg, workdir): the one function that wires config, mesh, model, data and loop together.

Where the state comes from, in order of precedence:
  1. the newest loadable checkpoint in `workdir/checkpoints` (resume: exact, same data order);
  2. `checkpoint.init_from` (another run: 'params' or 'full' state), only when 1 has none;
  3. a fresh, seeded initialisation.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import jax

import bigjax
from bigjax import (
    checkpoint,
    history,
    integrity,
    memory,
    metrics,
    models,
    runlock,
    tuning,
)
from bigjax.config import ConfigError, TrainConfig, to_dict
from bigjax.data import pipeline
from bigjax.loop import (  # noqa: F401 - re-exported: the tools and tests use train.X
    MAX_ROLLBACKS,
    Evaluator,
    NonFiniteError,
    StepLog,
    Window,
    interrupt_if_asked,
    keep_only_the_error,
    open_workdir,
    report_done,
    restore_or_init,
    run_eval,
    run_summary,
    start_banner,
    stop_on_signals,
    write_summary,
)
from bigjax.mesh import make_mesh
from bigjax.program import make_program
from bigjax.sharding import placed


def train(cfg: TrainConfig, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    workdir = Path(workdir)
    started = time.perf_counter()
    cfg = tuning.for_devices(cfg, jax.devices())
    writer_process = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    memory.check(cfg, dict(mesh.shape), jax.local_devices())  # before anything is allocated
    tokenizer = pipeline.tokenizer_for(cfg.data)
    if cfg.model.vocab_size < tokenizer.vocab_size and cfg.data.task != "images":
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tokenizer.kind} "
            f"tokenizer's {tokenizer.vocab_size} tokens; set it to at least that."
        )

    # Measured before the mesh is set: on CPU it runs a matmul on one device.
    peak = metrics.total_peak_flops(jax.devices(), cfg.metrics.peak_flops)

    with jax.set_mesh(mesh), stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        if writer_process:  # one writer per run; the kernel frees it however this ends
            fresh = open_workdir(workdir)
            lock = runlock.acquire(workdir)
            cleanup.callback(lock.release)
            if fresh:  # failing before its first checkpoint, it leaves only error.log
                cleanup.push(keep_only_the_error(workdir))
            if lock.previous:
                print(
                    f"warning: {workdir} was last trained by {runlock.describe(lock.previous)}, "
                    "which ended without releasing it (killed or crashed); taking it over.",
                    flush=True,
                )
        prog = make_program(cfg, mesh)

        def new_data_iter() -> Any:
            return pipeline.for_config(
                cfg.data,
                split="train",
                seed=cfg.data_seed,
                rows=prog.local_rows(),
                image_shape=(cfg.model.image_size, cfg.model.channels),
            )

        data_iter = new_data_iter()
        # Whatever happens below, stop the Grain workers (of the current iterator: it is
        # replaced on rollback) and let Orbax finish or abandon its background writes.
        cleanup.callback(lambda: getattr(data_iter, "close", lambda: None)())
        saves = checkpoint.Checkpointer(workdir / "checkpoints", cfg.checkpoint)
        cleanup.callback(saves.close)
        target = placed(prog.abstract, prog.shardings)
        layout = checkpoint.param_layout(prog.abstract.params)
        config = to_dict(cfg)  # checked against the checkpoint's: some changes cannot resume
        state, origin = restore_or_init(cfg, prog, saves.manager, target, data_iter, layout, config)
        start = int(jax.device_get(state.step))
        resumed = origin.startswith("resuming")
        saved_config = checkpoint.saved_config(saves.manager, start) if resumed else None

        num_params = models.count_params(prog.graph_state)
        meta = {
            "bigjax_version": bigjax.__version__,
            "config": config,
            "mesh": dict(mesh.shape),
            "num_params": num_params,
            "params": layout,
        }
        writers = metrics.Writers(
            workdir,
            enabled=writer_process,
            tensorboard=cfg.metrics.tensorboard,
            wandb_project=cfg.metrics.wandb_project,
            config=config,
        )
        if writer_process:
            (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            writers.truncate_after(start)
            print(start_banner(prog, num_params, origin), flush=True)
            history.record(workdir, start, config, saved_config)  # and shows what changed

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops_per_step = (
            models.FLOPS_PER_TOKEN[cfg.model.family](cfg.model, cfg.data.seq_len) * tokens_per_step
        )

        evaluator = Evaluator(prog, writers, tokenizer)

        log = StepLog(cfg, writers, flops_per_step, peak, prog.accounting, warn=writer_process)
        # counted over every launch of the run (its rows after `start` were dropped above)
        log.skipped_steps = (metrics.last_logged(writers.path, "skipped_steps", start) or (0, 0))[1]

        step = start
        pending = None  # the step dispatched before this one: (step, metrics on device)
        saved_step = start if resumed else -1
        last_eval: dict[str, float] = {}
        skip_batches: set[int] = set()  # steps whose batch is dropped after a rollback
        rollbacks = 0
        while step < cfg.num_steps:
            interrupt_if_asked(stop)
            if step + 1 in skip_batches:
                next(data_iter)  # the batch that produced a non-finite step: drop it
            wait_start = time.perf_counter()
            local_batch = next(data_iter)
            dispatched = time.perf_counter()
            log.window.data_wait += dispatched - wait_start
            state, step_metrics = prog.train_step(state, prog.to_global(local_batch))
            step += 1
            bad_step = None
            # Fetch the previous step's metrics only now: the device already has this step.
            if pending is not None and not log.finish(*pending):
                bad_step = pending[0]
            pending = (step, step_metrics, time.perf_counter() - dispatched)
            eval_due = step == cfg.num_steps or (
                cfg.eval.every_steps and step % cfg.eval.every_steps == 0
            )
            save_due = saves.due(step)
            if bad_step is None and (eval_due or save_due or stop):
                # Finish this step first: rows stay in step order and no non-finite state is
                # ever evaluated or saved (eval and save sync on it anyway).
                if not log.finish(*pending):
                    bad_step = step
                pending = None
            # Finite loss and gradients can still leave overflowed optimizer moments: never
            # save those (checked on device, only at saves, which sync anyway).
            poisoned = bool(
                save_due and bad_step is None and not integrity.state_finite(state.opt_state)
            )
            if poisoned and cfg.nan_policy != "skip":
                bad_step = step
            if bad_step is not None and cfg.nan_policy != "skip":
                where = (
                    f"at step {bad_step} (loss {log.latest['loss']}, grad_norm "
                    f"{log.latest['grad_norm']}, param_norm {log.latest['param_norm']})"
                )
                if cfg.nan_policy == "error":
                    raise NonFiniteError(
                        f"non-finite loss or gradient {where} (the check covers the updated "
                        "parameters and, at saves, the optimizer moments); nothing of it was "
                        "saved. Lower optim.lr, keep optim.clip_norm on, or set "
                        "nan_policy=skip or rollback."
                    )
                rollbacks += 1
                if rollbacks > MAX_ROLLBACKS:
                    raise NonFiniteError(f"gave up after {MAX_ROLLBACKS} rollbacks; last {where}.")
                saves.wait()
                getattr(data_iter, "close", lambda: None)()  # stop its worker processes
                data_iter = new_data_iter()
                state = (
                    checkpoint.restore(saves.manager, target, data_iter, layout, config=config)
                    or prog.init()
                )
                step, pending = int(jax.device_get(state.step)), None
                skip_batches.add(bad_step)
                writers.truncate_after(step)
                print(
                    f"non-finite step {bad_step}: rolled back to step {step}; its batch "
                    "will be skipped",
                    flush=True,
                )
                continue
            if eval_due:
                last_eval = evaluator(step, state.params)
            if poisoned:
                print(f"warning: step {step}: optimizer moments not finite; not saved.", flush=True)
            elif save_due:
                saved = saves.save(state, data_iter, meta, metrics=last_eval if eval_due else None)
                saved_step = step if saved else saved_step
            if stop:
                print(
                    f"received {stop['signal']}: saving step {step} and stopping; run the "
                    "same command to resume.",
                    flush=True,
                )
                break
        if pending is not None:
            log.finish(*pending)

        interrupt_if_asked(stop)
        final_step = int(jax.device_get(state.step))
        if saved_step != final_step:
            saves.save(
                state,
                data_iter,
                meta,
                force=True,
                metrics=last_eval if last_eval.get("step") == final_step else None,
            )
        saves.wait()
        writers.close()

    if writer_process:
        summary = run_summary(cfg, workdir, final_step, log.skipped_steps, num_params)
        report_done(cfg, workdir, summary, time.perf_counter() - started, last_eval, stop, start)
    return {**log.last, **last_eval}
