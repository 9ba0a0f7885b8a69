"""Reading other runs' checkpoints, never writing them: the parameters the tools and a
teacher load, and the state a new run starts from (`checkpoint.init_from`). Every loader
verifies a step's checksums first and takes the newest intact step."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from bigjax import integrity, stages
from bigjax.checkpoint import (
    CheckpointError,
    check_layout,
    param_layout,
    read_meta,
    restore,
    warn_if_unsealed,
)
from bigjax.data.pipeline import Batches
from bigjax.state import TrainState
from bigjax.tree import Params


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
    data_iter: Batches | None,
    layout: dict[str, list[int]],
    fresh: TrainState,
    layer_order: Sequence[int] | None = None,
) -> tuple[TrainState, int]:
    """State initialised from another run's newest intact checkpoint, and that checkpoint's
    step.

    mode 'full': step, parameters and optimizer state (continue or cool down a run; the data
    iterator continues too). 'params': parameters only, with `fresh`'s step 0 and optimizer.
    """
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(source_directory(path).absolute(), options=options)
    state: TrainState | None
    try:
        if mode == "full":
            state = restore(
                manager, target, data_iter, layout, move_corrupt=False, layer_order=layer_order
            )
            source_step = 0 if state is None else int(jax.device_get(state.step))
        else:
            source_step = newest_intact(manager) or 0
            state = _restore_params(manager, source_step, target, layout, fresh, layer_order)
    finally:
        manager.close()
    if state is None:
        raise CheckpointError(f"checkpoint.init_from: no checkpoint in {path!r}.")
    return state, source_step


def newest_intact(manager: ocp.CheckpointManager) -> int | None:
    """The newest step whose checksums pass, for loaders that only read (eval, generate,
    export, init_from, a teacher): a corrupt step is skipped with a warning naming the file,
    never moved (it may be another run's directory). None if there are no steps; raises if
    none is intact."""
    directory = Path(manager.directory)
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem = integrity.verify(directory / str(step))
        if problem is None:
            warn_if_unsealed(directory / str(step))
            return step
        failures.append(f"{directory / str(step)}: {problem}")
        warnings.warn(
            f"checkpoint {directory / str(step)} is corrupt ({problem}); using an older step.",
            stacklevel=2,
        )
    if failures:
        raise CheckpointError(
            "no intact checkpoint to load:\n  " + "\n  ".join(failures) + "\nRetrain from "
            "the run's own relaunch (it sets corrupt steps aside), or restore a copy."
        )
    return None


def load_params(
    path: str, target_params: Params, layer_order: Sequence[int] | None = None
) -> tuple[Params, int]:
    """The parameters of a run's newest intact checkpoint, restored into `target_params`'
    shardings (for generation, evaluation, export), the stacked layers in `layer_order`
    (None: the model's); returns (params, step)."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(source_directory(path).absolute(), options=options)
    try:
        step = newest_intact(manager)
        if step is None:
            raise CheckpointError(f"no checkpoint in {path!r}: train the run first.")
        layout = param_layout(target_params)
        params = _restore_params_only(manager, step, target_params, layout, layer_order)
    finally:
        manager.close()
    return params, step


def _restore_params(
    manager: ocp.CheckpointManager,
    step: int,
    target: TrainState,
    layout: dict[str, list[int]],
    fresh: TrainState,
    layer_order: Sequence[int] | None,
) -> TrainState | None:
    # What fine-tuning adds (LoRA adapters, a classification head) and the source lacks
    # starts fresh; everything else must be in the checkpoint, with the same shapes.
    if step not in manager.all_steps():
        return None
    saved = read_meta(manager, step).get("params", {})
    saved_tops = {p.split("/", 1)[0] for p in saved}
    new = {k for k in target.params if k in FINETUNE_ADDITIONS and k not in saved_tops}
    base = {k: v for k, v in target.params.items() if k not in new}
    base_layout = {k: v for k, v in layout.items() if k.split("/", 1)[0] not in new}
    params = _restore_params_only(manager, step, base, base_layout, layer_order)
    params = {**params, **{k: fresh.params[k] for k in new}}
    return TrainState(step=fresh.step, params=params, opt_state=fresh.opt_state)


# Parameters a fine-tuning run may add to the model it starts from (checkpoint.init_from).
FINETUNE_ADDITIONS = ("lora", "cls_head_DC", "cls_bias_C")


def _restore_params_only(
    manager: ocp.CheckpointManager,
    step: int,
    target_params: Any,
    layout: dict[str, list[int]],
    layer_order: Sequence[int] | None,
) -> Any:
    """The parameters of `step`, which the caller verified (`newest_intact`), the stacked
    layers in `layer_order`."""
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
    saved_order = read_meta(manager, step).get("layer_order")
    return stages.reorder(restored["state"]["params"], saved_order, layer_order)
