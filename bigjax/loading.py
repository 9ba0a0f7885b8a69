"""Reading checkpoints back, never writing them (bigjax/checkpoint.py writes): a run's own
resume (`restore`: falls back past a step that fails to load, warning with its path, and never
turns an unreadable directory into a silent fresh start), the state a new run starts from
(`checkpoint.init_from`) and the parameters the tools and a teacher load. Every reader verifies
a step's checksums before it reads anything of it."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from bigjax import history, integrity, models, stages
from bigjax.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    DataRestore,
    check_path,
    first_line,
    param_layout,
)
from bigjax.config import CheckpointConfig, ConfigError, from_configdict
from bigjax.data.datastate import DataStateError, MalformedDataState
from bigjax.data.pipeline import Batches
from bigjax.errors import BigjaxWarning
from bigjax.sharding import Rules, num_stages, placed, tree_shardings
from bigjax.state import TrainState
from bigjax.tree import Params


def _layout_mismatch(saved: dict[str, list[int]], current: dict[str, list[int]]) -> list[str]:
    out = []
    for name in sorted(saved.keys() | current.keys()):
        a, b = saved.get(name), current.get(name)
        if a != b:
            out.append(f"{name}: checkpoint {a or 'missing'} vs model {b or 'missing'}")
    return out


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The step's `meta` item (config, parameter layout, versions), read through Orbax alone;
    {} if it has none that is readable (the restore of the state then says what is wrong)."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # missing, unreadable or not JSON: whatever Orbax raises for it
        return {}
    return meta if isinstance(meta, dict) else {}


def check_layout(
    manager: ocp.CheckpointManager, step: int, layout: dict[str, list[int]], why: str = ""
) -> None:
    """Raises CheckpointError listing every parameter whose name or shape differs (after
    `why`, the config keys that changed them, when known)."""
    saved = read_meta(manager, step).get("params")
    if not isinstance(saved, dict):
        return  # no readable metadata: the restore itself will tell
    mismatched = _layout_mismatch(saved, layout)
    if mismatched:
        shown = "\n  ".join(mismatched[:20]) + ("\n  ..." if len(mismatched) > 20 else "")
        raise CheckpointMismatch(
            f"checkpoint {manager.directory}/{step} holds another model shape "
            f"({len(mismatched)} parameters differ):\n  {shown}\n"
            + (why or "Use a new --workdir, or set the model config it was trained with.")
        )


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The config the checkpoint at `step` was saved under (None if it has no readable one)."""
    config = read_meta(manager, step).get("config")
    return config if isinstance(config, dict) else None


def check_config(
    manager: ocp.CheckpointManager,
    step: int,
    config: Mapping[str, object] | None,
    layout: dict[str, list[int]],
) -> None:
    """Raises CheckpointMismatch if the checkpoint at `step` cannot continue under `config`:
    keys whose change makes the saved state unusable (history.UNUSABLE), each named with both
    values and the way out, and parameters of another shape, each listed. A checkpoint
    without a readable config is judged by its parameters alone."""
    saved = saved_config(manager, step)
    problem = None
    if config is not None and saved is not None:
        changed = history.changes(saved, config)
        problem = history.unusable(changed, str(Path(manager.directory).parent))
    check_layout(manager, step, layout, f"The config changed: {problem}" if problem else "")
    if problem:
        raise CheckpointMismatch(
            f"checkpoint {manager.directory}/{step} cannot continue with this config: {problem}"
        )


def start_state(
    manager: ocp.CheckpointManager,
    target: TrainState,
    data_iter: Batches,
    layout: dict[str, list[int]],
    *,
    layer_order: Sequence[int],
    config: Mapping[str, object],
    source: CheckpointConfig,
    fresh: Callable[[], TrainState],
) -> tuple[TrainState, str]:
    """The state a run starts or rolls back to, and where it came from: its newest loadable
    checkpoint in `manager` (resume), else `source.init_from` (another run), else `fresh()`.
    The data iterator is put where that state left it. One path for both, so a rollback
    before the first save starts where the run started (a fine-tuning run's init_from
    weights, not a random init) and the stacked layers come back in the run's order."""
    state = restore(manager, target, data_iter, layout, config=config, layer_order=layer_order)
    if state is not None:
        return state, f"resuming from step {int(state.step)}"
    if not source.init_from:
        return fresh(), "fresh start"
    state, source_step = init_from(
        source.init_from, source.init_mode, target, data_iter, layout, fresh(), layer_order
    )
    what = (
        f"its whole state: continuing at step {source_step}"
        if source.init_mode == "full"
        else "its parameters, a fresh optimizer from step 0"
    )
    return state, f"initialised from {source.init_from} at its step {source_step} ({what})"


def restore(
    manager: ocp.CheckpointManager,
    target: TrainState,
    data_iter: Batches | None,
    layout: dict[str, list[int]],
    *,
    move_corrupt: bool = True,
    config: Mapping[str, object] | None = None,
    layer_order: Sequence[int] | None = None,
    restart_other_data: bool = False,
) -> TrainState | None:
    """Restores the newest good checkpoint into `target`'s shapes and shardings (resharding
    if the mesh changed), and the data iterator in place.

    Returns None when there is no checkpoint and none was ever set aside. A step that fails
    its checksums, does not load, holds a malformed data state or a non-finite state is
    skipped with a warning naming it and the reason, and (with `move_corrupt`, never for
    another run's directory) moved to `<checkpoints>.corrupt/`; if no step is good, or only
    set-aside steps are left, raises: every relaunch, until the user moves them away.
    `config` (this run's, as a dict) is checked against the checkpoint's: a change that makes
    the saved state unusable (another optimizer, model shape, ...) is a CheckpointMismatch,
    never mistaken for corruption. The stacked layers come back in `layer_order` (the run's,
    bigjax/stages.py; None: the model's), whatever order the checkpoint recorded. A data
    state of other data under a source's name is a CheckpointMismatch too, or with
    `restart_other_data` (another run's state) that data is read from its beginning.
    """
    directory = Path(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        step_dir = directory / str(step)
        # Its bytes first: nothing of a step, its metadata included, is read before its
        # checksums pass, so a flipped bit is never taken for a change of config.
        # each process hashes its share of the files, and all take the shared verdict
        share = (jax.process_index(), jax.process_count())
        problem = _agreed(integrity.checked(step_dir, share))
        sealed = integrity.is_sealed(step_dir)
        restored, mismatch = None, None
        if problem is None:
            if read_meta(manager, step).get("params_only"):
                raise CheckpointError(
                    f"{directory} holds parameters only (an imported model), not a training "
                    "state to resume: train from it in a new run with "
                    f"--config.checkpoint.init_from={directory.parent}."
                )
            check_config(manager, step, config, layout)
            try:
                both = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        data=DataRestore(data_iter, restart_other_data),
                    ),
                )
                restored, refused = both["state"], both["data"]
                if isinstance(refused, DataStateError):  # readable; this run can't go on
                    mismatch = f"checkpoint {step_dir}: {refused.for_run(directory.parent)}"
            except Exception as e:  # corrupt or truncated files, a malformed data state
                if sealed and not isinstance(e, MalformedDataState):
                    # Its bytes are the ones written: this run's state is what differs.
                    raise CheckpointMismatch(
                        f"checkpoint {step_dir} is intact (its checksums match) but does not "
                        f"restore into this run's state ({type(e).__name__}: {first_line(e)}"
                        "): the config changed what the state holds (optimizer, fine-tuning "
                        "setup). Set it back, or start a new --workdir with "
                        f"--config.checkpoint.init_from={directory.parent} "
                        "--config.checkpoint.init_mode=params."
                    ) from e
                problem = f"unreadable: {type(e).__name__}: {first_line(e)}"
        if restored is not None and not integrity.state_finite(
            (restored.params, restored.opt_state)
        ):
            problem = "its parameters or optimizer moments are not finite"
        problem = _agreed(problem)  # every process returns this step, or falls back, together
        # a data state one process cannot continue (its own copy of the data differs): all stop
        others = (
            f"checkpoint {step_dir}: process {{k}} cannot continue its data state (see its error)"
        )
        if mismatch := _agreed(mismatch, others):
            raise CheckpointMismatch(mismatch)
        if problem is None and restored is not None:
            # a new run from another's whole state: where one process's copy of the data
            # differs, every process reads from the beginning (a global batch, one order)
            restarted = data_iter is not None and data_iter.restarted
            told = "process {k} finds other data than the saved order's"
            if restart_other_data and (why := _agreed("restarted" if restarted else None, told)):
                if not restarted and data_iter is not None:
                    warnings.warn(f"{why}: every process reads its data from the beginning.",
                                  BigjaxWarning, stacklevel=2)  # fmt: skip
                    data_iter.restart()
            saved_order = read_meta(manager, step).get("layer_order")
            return stages.reorder(restored, saved_order, layer_order)
        failures.append(f"{step_dir}: {problem}")
        where = ""
        if move_corrupt:  # by one process: the others would find it gone and fail
            if jax.process_index() == 0:
                where = f"; moved to {integrity.quarantine(step_dir)}"
            else:
                where = f"; moved to {integrity.aside_dir(directory)} by process 0"
            _together(f"bigjax: step {step} moved aside")  # before anyone lists the steps again
            manager.reload()
        warnings.warn(
            f"checkpoint {step_dir} is unreadable or corrupt ({problem}){where}; falling back "
            "to the previous one.",
            category=BigjaxWarning,
            stacklevel=2,
        )
    aside = integrity.set_aside(directory)
    if not failures and not aside:
        return None  # a new run
    # Starting from scratch here would retrain over the run and truncate its metrics, and an
    # automatic restarter (SLURM requeue, a sweep's retry) would do it unasked: refuse, on
    # this relaunch and every later one, until a person moves the set-aside steps away.
    lines = failures + ([f"set aside earlier as corrupt: {', '.join(aside)}"] if aside else [])
    raise CheckpointError(
        f"no checkpoint of {directory} can be restored; refusing to start from scratch over "
        "them:\n  " + "\n  ".join(lines) + f"\nTo start this run afresh, delete or move away "
        f"{integrity.aside_dir(directory)} (and {directory}, if it still holds steps)."
    )


def _agreed(problem: str | None, seen: str = "damaged as process {k} read it") -> str | None:
    """A step's verdict, the same on every process. They restore it together, so a step one
    process finds damaged is damaged for all, and all fall back to the same step; alone,
    each process judged for itself and moved the step aside, and the slower one failed on
    the step the other had moved (the job then aborted in jax's shutdown barrier). Shared,
    it also lets each process hash only its share of the files: a pod's checkpoint is read
    once, not once per host."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils

    damaged = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is None and damaged.any():
        return seen.format(k=int(np.argmax(damaged)))
    return problem


def _together(name: str) -> None:
    """Waits for every process (a no-op alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def source_directory(path: str) -> Path:
    """A run's workdir or its checkpoints/ directory -> the checkpoints directory."""
    p = Path(path)
    directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not directory.is_dir():
        raise CheckpointError(f"no such run or checkpoint directory {path!r}.")
    return check_path(directory)


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
            # another run's data order, unless its data changed under a source's name
            state = restore(manager, target, data_iter, layout, move_corrupt=False,
                            layer_order=layer_order, restart_other_data=True)  # fmt: skip
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
    steps = sorted(manager.all_steps(), reverse=True)
    for step, older in zip(steps, [*steps[1:], None], strict=True):
        problem = integrity.checked(directory / str(step))
        if problem is None:
            return step
        failures.append(f"{directory / str(step)}: {problem}")
        if older is not None:  # with none left, the error below names every failure
            warnings.warn(
                f"checkpoint {directory / str(step)} is corrupt ({problem}); trying step {older}.",
                category=BigjaxWarning,
                stacklevel=2,
            )
    if failures:
        raise CheckpointError(
            "no intact checkpoint to load:\n  " + "\n  ".join(failures) + "\nRetrain from "
            "the run's own relaunch (it sets corrupt steps aside), or restore a copy."
        )
    return None


def run_config(run_dir: str) -> tuple[int, dict[str, Any], list[str]]:
    """A trained run's newest intact step, the config that step was saved with (verified with
    it by its checksums; the run's config.json for a checkpoint without one), and the keys in
    which config.json differs from it (['unreadable'] for a damaged file): config.json is a
    plain file beside the checkpoints, and a flipped digit that still parses would change the
    model silently."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(source_directory(run_dir).absolute(), options=options)
    try:
        step = newest_intact(manager)
        if step is None:
            raise CheckpointError(f"no checkpoint in {run_dir!r}: train the run first.")
        saved = saved_config(manager, step)
    finally:
        manager.close()
    path = Path(run_dir) / "config.json"
    if saved is None:
        return step, _read_config(path), []
    try:
        return step, saved, list(history.changes(saved, _read_config(path)))
    except ConfigError:
        return step, saved, ["unreadable"]


def _read_config(path: Path) -> dict[str, Any]:
    """A run's config.json, or a one-line error naming it when it is damaged."""
    try:
        raw = json.loads(path.read_bytes())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return raw
    except ValueError as e:  # JSON or UTF-8
        raise ConfigError(f"{path} is damaged ({e}) and its checkpoint has no config of its "
                          "own; restore the file.") from None  # fmt: skip


def load_params(
    path: str,
    target_params: Params,
    layer_order: Sequence[int] | None = None,
    step: int | None = None,
) -> tuple[Params, int]:
    """The parameters of a run's newest intact checkpoint (or of `step`, one the caller has
    found intact), restored into `target_params`' shardings (for generation, evaluation,
    export), the stacked layers in `layer_order` (None: the model's); returns (params, step)."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(source_directory(path).absolute(), options=options)
    try:
        step = newest_intact(manager) if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {path!r}: train the run first.")
        layout = param_layout(target_params)
        params = _restore_params_only(manager, step, target_params, layout, layer_order)
    finally:
        manager.close()
    return params, step


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A distillation teacher: its program, its latest parameters and their shardings."""

    graphdef: nnx.GraphDef
    params: Params
    shardings: Params  # the same tree, of NamedShardings


def teacher(run_dir: str, vocab_size: int, rules: Rules, mesh: Mesh) -> Teacher:
    """The teacher run's program and latest parameters, sharded by the student's rules on
    its mesh; refused when it cannot teach a student of `vocab_size` tokens."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"distill.teacher: {path} is missing; pass a run directory.")
    step, config, _ = run_config(run_dir)
    cfg = from_configdict(config)
    if cfg.model.vocab_size != vocab_size:
        raise ConfigError(
            f"distill.teacher: its vocab_size {cfg.model.vocab_size} differs from the "
            f"student's {vocab_size}; distillation matches token distributions."
        )
    if cfg.finetune.lora_rank:
        raise ConfigError(
            "distill.teacher: a LoRA run; merge it first (bigjax compress or convert write "
            "merged weights) and distill from that."
        )
    m = cfg.model
    graphdef, graph_state = models.abstract(m, rules)
    shardings = nnx.to_pure_dict(tree_shardings(graph_state, mesh, rules))
    target = placed(nnx.to_pure_dict(graph_state), shardings)
    count = num_stages(rules, mesh.shape, m.num_layers)
    # the teacher's layers, stacked in the order this mesh's stages keep them
    order = stages.layer_order(m.num_layers, count, m.pipeline_interleave)
    params, _ = load_params(run_dir, target, order, step)
    return Teacher(graphdef, params, shardings)


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
