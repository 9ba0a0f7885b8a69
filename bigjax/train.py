"""train(cfg, workdir): the one function that wires config, mesh, model, data and loop together.

Setup, in order: the config tuned for these devices and its mesh -> the resources it names
(tokenizer, teacher, example counts; read once; the tokenizer kept in the run directory, a
resume's checked against it) -> the program (task and objective, abstract
state, shardings, the jitted steps: `make_program`) -> the run directory -> the data -> the
state, restored or initialised. Then the loop: a step, its metrics read one step late, evals
and saves when due, the NaN policy on a non-finite step.

Where the state comes from, in order of precedence:
  1. the newest loadable checkpoint in `workdir/checkpoints` (resume: exact, same data order);
  2. `checkpoint.init_from` (another run: 'params' or 'full' state), only when 1 has none;
  3. a fresh, seeded initialisation.
"""

from __future__ import annotations

import collections
import contextlib
import time
from pathlib import Path

import jax

from bigjax import checkpoint, loading, memory, metrics, program, resources
from bigjax.config import TrainConfig
from bigjax.data import pipeline
from bigjax.data.tokenizer import keep_in_run
from bigjax.evals import EvalStopped, Evaluator
from bigjax.loop import NonFiniteError, StepLog, eval_missed, every, nan_verdict
from bigjax.mesh import for_run
from bigjax.rundir import RunDir
from bigjax.signals import StopVote, interrupt_if_asked, stop_on_signals
from bigjax.state import TrainState
from bigjax.tree import Params

__all__ = ["NonFiniteError", "train"]


def train(cfg: TrainConfig, workdir: str | Path) -> dict[str, float | None]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    started = time.perf_counter()
    cfg, mesh = for_run(cfg)
    s = program.shapes(cfg, mesh)  # the abstract state and its shardings: no FLOPs, no file
    memory.check(cfg, s.abstract, s.shardings, s.attention, jax.local_devices())
    # Measured before the mesh is set: on CPU it runs a matmul on one device.
    peak = metrics.total_peak_flops(jax.devices(), cfg.metrics.peak_flops)

    with jax.set_mesh(mesh), stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        run = RunDir.open(Path(workdir), cfg, cleanup)  # lock, writers; one writer process
        res = resources.load(cfg, mesh)
        # the run's copy of its tokenizer: a resume on data of another is refused (unrestored)
        keep_in_run(run.workdir, res.tokenizer, write=run.writer,
                    init_from=cfg.checkpoint.init_from, teacher=cfg.distill.teacher,
                    resuming=checkpoint.has_steps(run.workdir / "checkpoints"))  # fmt: skip
        prog = program.make_program(cfg, s, res)  # the objective and the jitted steps

        saves = checkpoint.Checkpointer(run.workdir / "checkpoints", cfg.checkpoint)
        cleanup.callback(saves.close)

        def restore_or_init() -> tuple[TrainState, pipeline.Batches, str]:
            """The state to start (or roll back) from, and the data iterator at its step."""
            data = prog.batches("train", cfg.data_seed)
            try:
                state, origin = loading.start_state(
                    saves.manager, prog.target, data, prog.layout, layer_order=prog.layer_order,
                    config=run.config, source=cfg.checkpoint, fresh=prog.init,
                )  # fmt: skip
            except BaseException:
                data.close()  # its Grain workers: the caller never gets to close it
                raise
            return state, data, origin

        state, data_iter, origin = restore_or_init()
        # Whatever happens below, stop the Grain workers (of the current iterator: it is
        # replaced on rollback) and let Orbax finish or abandon its background writes.
        cleanup.callback(lambda: data_iter.close())
        start = int(jax.device_get(state.step))
        meta = run.begin(prog, saves, start, origin)
        stop_vote = StopVote(stop, mesh)  # every process stops after the same step
        evaluator = Evaluator(prog, run.writers, stop_vote)
        cleanup.callback(evaluator.close)  # a benchmark's engine thread must not outlive it
        log = StepLog.resumed(prog, run, peak, start)

        step, pending = start, None  # pending: the step dispatched before this one
        saved_step = start if origin.startswith("resuming") else -1

        def evaluate(at_step: int, params: Params) -> dict[str, float] | None:
            """The eval at a step, logged; None if a stop left it unfinished (nothing of it
            logged: the relaunch evaluates that step)."""
            try:
                return evaluator(at_step, params)
            except EvalStopped:
                print(f"received {stop['signal']} during the eval of step {at_step}: left "
                      "unfinished.", flush=True)  # fmt: skip
                return None

        last_eval: dict[str, float] = {}
        stopped_in_eval = False
        if origin.startswith("resuming") and eval_missed(run, start, cfg):
            # the step saved was due an eval that a stop left unfinished (or its row was lost)
            row = evaluate(start, state.params)
            last_eval, stopped_in_eval = row or {}, row is None
        # batches dropped before a step: one for each rollback its non-finite result caused
        skip_batches: collections.Counter[int] = collections.Counter()
        rollbacks = 0
        # nan_policy=skip drops a non-finite update on device (the log warns and counts it):
        # such a step is not bad here, and evals and saves go on as due
        skip = cfg.nan_policy == "skip"
        while step < cfg.num_steps and not stopped_in_eval:
            interrupt_if_asked(stop)
            for _ in range(skip_batches[step + 1]):
                next(data_iter)  # the batches that produced a non-finite step: dropped
            wait_start = time.perf_counter()
            local_batch = next(data_iter)
            dispatched = time.perf_counter()
            log.window.data_wait += dispatched - wait_start
            state, step_metrics = prog.train_step(state, prog.to_global(local_batch))
            step += 1
            stopping = stop_vote()
            bad_step = None
            # Fetch the previous step's metrics only now: the device already has this step.
            if pending is not None and not log.finish(*pending) and not skip:
                bad_step = pending[0]
            pending = (step, step_metrics, time.perf_counter() - dispatched)
            final = step == cfg.num_steps
            eval_due = final or every(step, cfg.eval.every_steps)
            save_due = final or stopping or every(step, cfg.checkpoint.every_steps)
            if bad_step is None and (eval_due or save_due):
                # Finish this step first: rows stay in step order and no non-finite state is
                # ever evaluated or saved (eval and save sync on it anyway).
                bad_step = None if log.finish(*pending) or skip else step
                pending = None
            if bad_step is None and eval_due:
                row = evaluate(step, state.params)
                if row is None:  # saved (with no eval metrics), then the loop stops
                    eval_due, save_due, stopping = False, True, True
                last_eval = row or last_eval
            if bad_step is None and save_due:
                try:
                    saves.save(state, data_iter, meta, force=final or stopping,
                               metrics=last_eval if eval_due else None)  # fmt: skip
                    saved_step = step
                except checkpoint.NonFiniteState:
                    # finite loss and gradients, overflowed optimizer moments: never saved
                    bad_step = None if skip else step
                    print(f"warning: step {step}: optimizer moments not finite; not saved.",
                          flush=True)  # fmt: skip
            if bad_step is not None:
                rollbacks += 1
                nan_verdict(cfg.nan_policy, bad_step, log.latest, rollbacks)  # raises, or:
                saves.wait()
                data_iter.close()  # stop its worker processes
                state, data_iter, _ = restore_or_init()
                step, pending = int(jax.device_get(state.step)), None
                skip_batches[bad_step] += 1  # failed there again: its new batch goes too
                run.writers.truncate_after(step)
                print(f"non-finite step {bad_step}: rolled back to step {step}; its batch "
                      "will be skipped", flush=True)  # fmt: skip
                continue
            if stop_vote.now():
                print(f"received {stop['signal']}: saving step {step} and stopping; run the "
                      "same command to resume.", flush=True)  # fmt: skip
                break
        if pending is not None:
            log.finish(*pending)

        interrupt_if_asked(stop)
        final_step = int(jax.device_get(state.step))
        if saved_step != final_step:  # a relaunch of a complete run saves nothing new
            saves.save(state, data_iter, meta, force=True)
        saves.wait()
        run.writers.close()

    run.end(final_step, log.skipped_steps, time.perf_counter() - started, last_eval, stop, start)
    return {**log.last, **last_eval}
