"""Orbax checkpoints: train state + data-iterator state + run metadata, saved asynchronously."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from bigjax.config import CheckpointConfig
from bigjax.state import TrainState


def make_manager(directory: Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        save_interval_steps=max(cfg.every_steps, 1),
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
) -> bool:
    """Starts a (possibly async) save at `state.step`; returns whether one was started."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta),
    )
    return manager.save(step, args=args, force=force)


def restore_latest(
    manager: ocp.CheckpointManager, target: TrainState, data_iter: Any
) -> TrainState | None:
    """Restores the newest checkpoint into `target`'s shapes and shardings, and the data
    iterator in place. Returns None when the directory holds no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(data_iter),
        ),
    )
    return restored["state"]


def restore_target(abstract: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the shardings to restore into (resharding if they differ)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
