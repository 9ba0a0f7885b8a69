"""Orbax checkpoints: train state + data-iterator state + run metadata, saved asynchronously.

Integrity comes from Orbax's atomic commit: a step is written to a temporary directory and
renamed into place when complete, so a save killed mid-write is never listed. On top of that,
`restore` falls back past a checkpoint that fails to load (warning with its path), and never
turns an unreadable directory into a silent fresh start. Nothing here unpickles: the state is
tensorstore arrays, the data-iterator state and the metadata are JSON.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from bigjax.config import CheckpointConfig
from bigjax.data.pipeline import DataStateError
from bigjax.state import TrainState
from bigjax.tree import path_name


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or restored; the message names it and the fix."""


class DataHandler(ocp.CheckpointHandler):
    """The data iterator's state as JSON. Each process writes the batch rows it owns; a restore
    merges every process's file, so a checkpoint written by P processes resumes on any number
    (the state is per global batch row, see `pipeline.Batches`)."""

    def save(self, directory: Path, args: DataSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (Path(directory) / name).write_text(json.dumps(args.item.get_state()))

    def restore(self, directory: Path, args: DataRestore) -> Any:
        files = sorted(Path(directory).glob("process_*-of-*.json"))
        if not files:
            raise FileNotFoundError(f"no data-iterator state in {directory}")
        states = [json.loads(f.read_text()) for f in files]
        if len({s["batch_size"] for s in states}) != 1:
            raise ValueError(f"the data states in {directory} disagree on the batch size")
        rows = {row: s for state in states for row, s in state["rows"].items()}
        args.item.set_state({"batch_size": states[0]["batch_size"], "rows": rows})
        return args.item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


def make_manager(directory: Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """Keeps the newest `keep`, every `keep_every`-th step, and the `keep_best` lowest eval
    losses: a step is deleted only when no rule wants it."""
    keep = [policies.LatestN(cfg.keep)]
    if cfg.keep_every:
        keep.append(policies.EveryNSteps(cfg.keep_every))
    if cfg.keep_best:
        best = policies.BestN(
            get_metric_fn=lambda m: m["eval_loss"],
            reverse=True,
            n=cfg.keep_best,
            keep_checkpoints_without_metrics=False,
        )
        keep.append(best)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(cfg.every_steps, 1),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save(
    manager: ocp.CheckpointManager,
    state: TrainState,
    data_iter: Any,
    meta: dict[str, Any],
    *,
    force: bool = False,
    metrics: dict[str, float] | None = None,
) -> bool:
    """Starts a (possibly async) save at `state.step`; returns whether one was started.

    A failure of an earlier async save surfaces here (Orbax re-raises it on the next call).
    """
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataSave(data_iter),
        meta=ocp.args.JsonSave(meta),
    )
    try:
        return manager.save(step, args=args, force=force, metrics=metrics)
    except Exception as e:
        raise _save_error(manager, step, e) from e


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until pending async saves are committed; raises CheckpointError if one failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _save_error(manager, manager.latest_step(), e) from e


def _save_error(manager: ocp.CheckpointManager, step: int | None, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"saving a checkpoint (step {step}) in {manager.directory} failed: "
        f"{type(e).__name__}: {e}. Check free disk space and write permissions there."
    )


def _layout_mismatch(saved: dict[str, list[int]], current: dict[str, list[int]]) -> list[str]:
    out = []
    for name in sorted(saved.keys() | current.keys()):
        a, b = saved.get(name), current.get(name)
        if a != b:
            out.append(f"{name}: checkpoint {a or 'missing'} vs model {b or 'missing'}")
    return out


def write_params_run(dst: Path, config: dict[str, Any], params: Any, **meta: Any) -> None:
    """A run directory holding only parameters (an imported or compressed model): config.json
    and a parameters-only checkpoint at step 0, which generate, eval, convert and
    checkpoint.init_from open like any run."""
    dst = Path(dst)
    if (dst / "checkpoints").exists():
        raise CheckpointError(f"{dst} already holds checkpoints; pick a new directory.")
    dst.mkdir(parents=True, exist_ok=True)
    layout = param_layout(params)
    save_params(dst / "checkpoints", params, {"config": config, "params": layout, **meta})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    path = Path(manager.directory) / str(step) / "meta" / "metadata"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def check_layout(manager: ocp.CheckpointManager, step: int, layout: dict[str, list[int]]) -> None:
    """Raises CheckpointError listing every parameter whose name or shape differs."""
    saved = _read_meta(manager, step).get("params")
    if not isinstance(saved, dict):
        return  # no readable metadata: the restore itself will tell
    mismatched = _layout_mismatch(saved, layout)
    if mismatched:
        shown = "\n  ".join(mismatched[:20]) + ("\n  ..." if len(mismatched) > 20 else "")
        raise CheckpointError(
            f"checkpoint {manager.directory}/{step} holds another model shape "
            f"({len(mismatched)} parameters differ):\n  {shown}\nUse a new --workdir, or set "
            "the model config the checkpoint was trained with."
        )


def restore(
    manager: ocp.CheckpointManager,
    target: TrainState,
    data_iter: Any,
    layout: dict[str, list[int]],
    *,
    before: int | None = None,
) -> TrainState | None:
    """Restores the newest loadable checkpoint (older than `before`, if given) into `target`'s
    shapes and shardings (resharding if the mesh changed), and the data iterator in place.

    Returns None when there is no checkpoint at all. A checkpoint that fails to load is
    skipped with a warning naming it; if checkpoints exist but none loads, raises.
    """
    steps = sorted((s for s in manager.all_steps() if before is None or s < before), reverse=True)
    if not steps:
        return None
    failures = []
    for step in steps:
        if _read_meta(manager, step).get("params_only"):
            raise CheckpointError(
                f"{manager.directory} holds parameters only (an imported model), not a "
                "training state to resume: train from it in a new run with "
                f"--config.checkpoint.init_from={Path(manager.directory).parent}."
            )
        check_layout(manager, step, layout)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=DataRestore(data_iter),
                ),
            )
        except DataStateError as e:  # readable, but this config cannot continue it
            raise CheckpointError(f"checkpoint {manager.directory}/{step}: {e}") from e
        except Exception as e:  # corrupt or truncated files: fall back to an older step
            failures.append(f"{manager.directory}/{step}: {type(e).__name__}: {e}")
            warnings.warn(
                f"checkpoint {manager.directory}/{step} is unreadable ({type(e).__name__}: "
                f"{str(e)[:200]}); falling back to the previous one.",
                stacklevel=2,
            )
            continue
        return restored["state"]
    raise CheckpointError(
        "no checkpoint could be restored, refusing to start from scratch over them:\n  "
        + "\n  ".join(failures)
        + "\nMove the checkpoints directory away to start fresh."
    )


def save_params(directory: Path, params: Any, meta: dict[str, Any]) -> None:
    """A parameters-only checkpoint at step 0 (an imported model): what `load_params` and
    `checkpoint.init_from` read. `meta` must hold the parameter layout under "params"."""
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
    try:
        manager.save(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}),
                meta=ocp.args.JsonSave({**meta, "params_only": True}),
            ),
        )
        manager.wait_until_finished()
    finally:
        manager.close()


def restore_target(abstract: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the shardings to restore into (resharding if they differ)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def source_directory(path: str) -> Path:
    """A run's workdir or its checkpoints/ directory -> the checkpoints directory."""
    p = Path(path)
    directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not directory.is_dir():
        raise CheckpointError(f"no such run or checkpoint directory {path!r}.")
    return directory


def init_from(
    path: str,
    mode: str,
    target: TrainState,
    data_iter: Any,
    layout: dict[str, list[int]],
    fresh: TrainState,
) -> TrainState:
    """State initialised from another run's latest checkpoint.

    mode 'full': step, parameters and optimizer state (continue or cool down a run; the data
    iterator continues too). 'params': parameters only, with `fresh`'s step 0 and optimizer.
    """
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(source_directory(path).absolute(), options=options)
    try:
        if mode == "full":
            state = restore(manager, target, data_iter, layout)
        else:
            state = _restore_params(manager, target, layout, fresh)
    finally:
        manager.close()
    if state is None:
        raise CheckpointError(f"checkpoint.init_from: no checkpoint in {path!r}.")
    return state


def param_layout(abstract_params: Any) -> dict[str, list[int]]:
    """Parameter path -> shape: saved with every checkpoint, checked on every restore."""
    return {
        path_name(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)
    }


def load_params(path: str, target_params: Any) -> tuple[Any, int]:
    """The parameters of a run's latest checkpoint, restored into `target_params`'
    shardings (for generation and evaluation); returns (params, step)."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(source_directory(path).absolute(), options=options)
    try:
        params = _restore_params_only(manager, target_params, param_layout(target_params))
        step = manager.latest_step()
    finally:
        manager.close()
    if params is None:
        raise CheckpointError(f"no checkpoint in {path!r}: train the run first.")
    return params, step


def _restore_params(
    manager: ocp.CheckpointManager,
    target: TrainState,
    layout: dict[str, list[int]],
    fresh: TrainState,
) -> TrainState | None:
    # What fine-tuning adds (LoRA adapters, a classification head) and the source lacks
    # starts fresh; everything else must be in the checkpoint, with the same shapes.
    step = manager.latest_step()
    saved = _read_meta(manager, step).get("params", {}) if step is not None else {}
    saved_tops = {p.split("/", 1)[0] for p in saved}
    new = {k for k in target.params if k in FINETUNE_ADDITIONS and k not in saved_tops}
    base = {k: v for k, v in target.params.items() if k not in new}
    base_layout = {k: v for k, v in layout.items() if k.split("/", 1)[0] not in new}
    params = _restore_params_only(manager, base, base_layout)
    if params is None:
        return None
    params = {**params, **{k: fresh.params[k] for k in new}}
    return TrainState(step=fresh.step, params=params, opt_state=fresh.opt_state)


# Parameters a fine-tuning run may add to the model it starts from (checkpoint.init_from).
FINETUNE_ADDITIONS = ("lora", "cls_head_DC", "cls_bias_C")


def _restore_params_only(
    manager: ocp.CheckpointManager, target_params: Any, layout: dict[str, list[int]]
) -> Any:
    step = manager.latest_step()
    if step is None:
        return None
    check_layout(manager, step, layout)
    item = {"params": target_params}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
        ),
    )
    return restored["state"]["params"]
