"""train(cfg, workdir): the one function that wires config, mesh, model, data and loop together.

Where the state comes from, in order of precedence:
  1. the newest loadable checkpoint in `workdir/checkpoints` (resume: exact, same data order);
  2. `checkpoint.init_from` (another run: 'params' or 'full' state), only when 1 has none;
  3. a fresh, seeded initialisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

import bigjax
from bigjax import (
    checkpoint,
    distributed,
    integrity,
    metrics,
    models,
    privacy,
    runlock,
    tuning,
)
from bigjax import evaluate as evaluate_mc
from bigjax.config import ConfigError, TrainConfig, to_dict
from bigjax.data import pipeline
from bigjax.mesh import make_mesh
from bigjax.program import Program, make_program

MAX_ROLLBACKS = 5


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient under nan_policy='error'."""


def run_eval(prog: Program, params: Any) -> dict[str, float]:
    """Loss and perplexity over the first `eval.num_batches` batches of the held-out split,
    read in a fixed order so every eval of every run sees the same tokens."""
    cfg = prog.cfg
    it = pipeline.for_config(
        cfg.data,
        split="validation",
        seed=0,
        rows=prog.local_rows(),
        shuffle=False,
        workers=0,
        image_shape=(cfg.model.image_size, cfg.model.channels),
    )
    nll, weight, confusion, adv = 0.0, 0.0, 0.0, 0.0
    for local in pipeline.take(it, cfg.eval.num_batches):
        out = jax.device_get(prog.eval_step(params, prog.to_global(local)))
        nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight_sum"])
        confusion = confusion + out.get("confusion", 0.0)
        adv = adv + float(out.get("adv_nll_sum", 0.0))
    getattr(it, "close", lambda: None)()
    loss = nll / max(weight, 1.0)
    row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if cfg.robust.eval_attack != "none":  # the loss under the embedding-space attack
        row["eval_adv_loss"] = adv / max(weight, 1.0)
    if cfg.data.task in ("classify", "images"):  # accuracy, macro precision / recall / F1
        row.update(evaluate_mc.classification_metrics(confusion))
    return row


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, str]]:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to save and stop after the step
    in flight, instead of killing it. A second Ctrl-C interrupts at once. Repeated SIGTERMs
    do not: schedulers resend preemption notices, and PR_SET_PDEATHSIG fires once per
    reparenting as a dying parent's threads exit, and aborting the checkpoint save they
    asked for would lose the work they meant to keep. Once a stop was asked the process is on
    its way out, so SIGTERM stays ignored after the loop: a resent notice can no longer kill
    it between the final save and exit."""
    asked: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def handle(signum: int, frame: Any) -> None:
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.setdefault("signal", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if asked and s == signal.SIGTERM else handler)


@dataclasses.dataclass
class Window:
    """Throughput accounting between two logged steps."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: float = 0.0
    data_wait: float = 0.0


def write_summary(workdir: Path, summary: dict[str, Any], wall_s: float) -> None:
    """`summary.json`: where the run stands, for sweeps and `bigjax report`. Wall time adds up
    over resumes (a run killed with SIGKILL loses that attempt's time)."""
    path = workdir / "summary.json"
    before = json.loads(path.read_text()).get("wall_s", 0.0) if path.exists() else 0.0
    tmp = path.with_suffix(".tmp")
    tmp.write_text(metrics.json_text({**summary, "wall_s": before + wall_s}, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def train(cfg: TrainConfig, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    workdir = Path(workdir)
    started = time.perf_counter()
    cfg = tuning.for_devices(cfg, jax.devices())
    writer_process = jax.process_index() == 0
    if writer_process:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
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
            lock = runlock.acquire(workdir)
            cleanup.callback(lock.release)
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
        manager = checkpoint.make_manager(workdir / "checkpoints", cfg.checkpoint)
        cleanup.callback(manager.close)
        target = checkpoint.restore_target(prog.abstract, prog.shardings)
        layout = checkpoint.param_layout(prog.abstract.params)
        expect = {"optim.name": cfg.optim.name}  # another optimizer's state cannot continue
        state = checkpoint.restore(manager, target, data_iter, layout, expect=expect)
        origin = f"resuming from step {int(state.step)}" if state is not None else ""
        if state is None and cfg.checkpoint.init_from:
            state = checkpoint.init_from(
                cfg.checkpoint.init_from,
                cfg.checkpoint.init_mode,
                target,
                data_iter,
                layout,
                prog.init(),
            )
            origin = (
                f"initialised ({cfg.checkpoint.init_mode}) from "
                f"{cfg.checkpoint.init_from} at step {int(state.step)}"
            )
        if state is None:
            state = prog.init()
            origin = "fresh start"
        start = int(jax.device_get(state.step))

        num_params = models.count_params(prog.graph_state)
        meta = {
            "bigjax_version": bigjax.__version__,
            "config": to_dict(cfg),
            "mesh": dict(mesh.shape),
            "num_params": num_params,
            "params": layout,
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
                f"devices ({distributed.describe()}); {origin}",
                flush=True,
            )

        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        flops_per_step = (
            models.FLOPS_PER_TOKEN[cfg.model.family](cfg.model, cfg.data.seq_len) * tokens_per_step
        )

        choice_items = (
            evaluate_mc.items_for(cfg.eval.choices, cfg.data.eval_fraction, cfg.eval.choice_items)
            if cfg.eval.choices
            else []
        )
        scorer = evaluate_mc.make_scorer(prog.graphdef, cfg.finetune.lora_scale)  # compiled once

        def evaluate(at_step: int) -> dict[str, float]:
            row = {"step": at_step, **run_eval(prog, state.params)}
            text = f"eval @ {at_step}: loss {row['eval_loss']:.4f}, ppl {row['eval_ppl']:.2f}"
            if "f1" in row:
                text += f", accuracy {row['accuracy']:.1%}, macro F1 {row['f1']:.3f}"
            if choice_items:
                start = time.perf_counter()
                row.update(
                    evaluate_mc.score_items(
                        scorer, state.params, tokenizer, choice_items, cfg.data.seq_len
                    )
                )
                row["mc_eval_s"] = time.perf_counter() - start
                text += f", multiple choice {row['mc_accuracy']:.1%}"
            writers.write(row, text)
            return row

        last: dict[str, Any] = {}
        window = Window()
        compile_s: float | None = None
        skipped_steps = 0
        latest: dict[str, float] = {}  # the last finished step's metrics, logged or not

        def finish_step(done_step: int, device_metrics: dict[str, jax.Array]) -> bool:
            """Host side of one finished step: finiteness, throughput, logging. Returns
            whether the step was finite."""
            nonlocal last, compile_s, window, skipped_steps
            host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            # The device finished this step now and already runs the next: the next window
            # starts here, not after the logging below (which would shorten it, MFU > 100 %).
            fetched = time.perf_counter()
            latest.update(host, step=done_step)
            finite = bool(host.pop("finite"))
            if not finite and cfg.nan_policy == "skip" and writer_process:
                print(
                    f"warning: step {done_step} skipped: non-finite loss, gradient or updated "
                    f"parameters (loss {host['loss']}, grad_norm {host['grad_norm']}, "
                    f"param_norm {host['param_norm']}); the update was dropped.",
                    flush=True,
                )
            skipped_steps += not finite and cfg.nan_policy == "skip"
            window.steps += 1
            window.tokens += host.pop("tokens")
            first = compile_s is None
            if first:  # includes compilation: logged, but kept out of the throughput window
                compile_s = fetched - window.start
            if done_step % cfg.metrics.log_every and done_step != cfg.num_steps and not first:
                return finite
            elapsed = fetched - window.start
            step_time = None if first else elapsed / window.steps
            last = {
                "step": done_step,
                **host,
                "tokens_per_sec": None if first else window.tokens / elapsed,
                "step_time": step_time,
                "mfu": None if first else flops_per_step / step_time / peak,
                "eta_s": None if first else step_time * (cfg.num_steps - done_step),
                "compile_s": compile_s,
                # host time blocked on the input pipeline, per step and as a share
                "data_wait_s": window.data_wait / window.steps,
                "data_wait_frac": None if first else window.data_wait / elapsed,
                "skipped_steps": skipped_steps,
            }
            if prog.accounting is not None:  # the privacy spent so far (dp-accounting, RDP)
                last["dp_epsilon"] = privacy.epsilon(prog.accounting, done_step)
                last["dp_noise_multiplier"] = prog.accounting.noise_multiplier
            writers.write(last, metrics.progress_line(last, cfg.num_steps))
            window = Window(start=fetched)
            return finite

        step = start
        pending = None  # the step dispatched before this one: (step, metrics on device)
        saved_step = start if origin.startswith("resuming") else -1
        last_eval: dict[str, float] = {}
        skip_batches: set[int] = set()  # steps whose batch is dropped after a rollback
        rollbacks = 0
        while step < cfg.num_steps:
            if step + 1 in skip_batches:
                next(data_iter)  # the batch that produced a non-finite step: drop it
            wait_start = time.perf_counter()
            local_batch = next(data_iter)
            window.data_wait += time.perf_counter() - wait_start
            state, step_metrics = prog.train_step(state, prog.to_global(local_batch))
            step += 1
            bad_step = None
            # Fetch the previous step's metrics only now: the device already has this step.
            if pending is not None and not finish_step(*pending):
                bad_step = pending[0]
            pending = (step, step_metrics)
            eval_due = step == cfg.num_steps or (
                cfg.eval.every_steps and step % cfg.eval.every_steps == 0
            )
            save_due = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            if bad_step is None and (eval_due or save_due or stop):
                # Finish this step first: rows stay in step order and no non-finite state is
                # ever evaluated or saved (eval and save sync on it anyway).
                if not finish_step(*pending):
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
                    f"at step {bad_step} (loss {latest['loss']}, grad_norm {latest['grad_norm']}, "
                    f"param_norm {latest['param_norm']})"
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
                checkpoint.wait(manager)
                getattr(data_iter, "close", lambda: None)()  # stop its worker processes
                data_iter = new_data_iter()
                state = (
                    checkpoint.restore(manager, target, data_iter, layout, expect=expect)
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
                last_eval = evaluate(step)
            if poisoned:
                print(f"warning: step {step}: optimizer moments not finite; not saved.", flush=True)
            elif save_due:
                saved = checkpoint.save(
                    manager, state, data_iter, meta, metrics=last_eval if eval_due else None
                )
                saved_step = step if saved else saved_step
            if stop:
                print(
                    f"received {stop['signal']}: saving step {step} and stopping; run the "
                    "same command to resume.",
                    flush=True,
                )
                break
        if pending is not None:
            finish_step(*pending)

        final_step = int(jax.device_get(state.step))
        if saved_step != final_step:
            checkpoint.save(
                manager,
                state,
                data_iter,
                meta,
                force=True,
                metrics=last_eval if last_eval.get("step") == final_step else None,
            )
        checkpoint.wait(manager)
        writers.close()

    if writer_process:
        write_summary(
            workdir,
            {
                "step": final_step,
                "num_steps": cfg.num_steps,
                "complete": final_step >= cfg.num_steps,
                "eval_loss": last_eval.get("eval_loss")
                if last_eval.get("step") == final_step
                else None,
                "num_params": num_params,
                "tokens": final_step * tokens_per_step,
                "flops": final_step * flops_per_step,
                "skipped_steps": skipped_steps,
            },
            time.perf_counter() - started,
        )
        if cfg.metrics.plot and writers.path.exists():
            metrics.plot_loss(writers.path, workdir / "loss.png")
        status = f"eval loss {last_eval['eval_loss']:.4f}" if last_eval else "no eval"
        if stop:
            status = f"stopped by {stop['signal']}"
        elif start == cfg.num_steps:
            status = "already complete"
        print(
            f"done: step {final_step}, {status}.\n"
            f"  metrics:     {workdir / 'metrics.jsonl'}\n"
            f"  plot:        {workdir / 'loss.png'}\n"
            f"  tensorboard: {workdir / 'tensorboard'}\n"
            f"  checkpoints: {workdir / 'checkpoints'}",
            flush=True,
        )
    return {**last, **last_eval}
