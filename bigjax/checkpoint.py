"""Orbax checkpoints: train state + data-iterator state + run metadata, saved asynchronously.

Integrity comes from Orbax's atomic commit: a step is written to a temporary directory and
renamed into place when complete, so a save killed mid-write is never listed. On top of that,
`restore` falls back past a checkpoint that fails to load (warning with its path), and never
turns an unreadable directory into a silent fresh start. Nothing here unpickles: the state is
tensorstore arrays, the data-iterator state and the metadata are JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from bigjax import history, integrity, stages
from bigjax.config import CheckpointConfig
from bigjax.data.pipeline import Batches, DataStateError, MalformedDataState
from bigjax.errors import RunFailed, UsageError
from bigjax.state import TrainState
from bigjax.tree import Params, path_name


class CheckpointError(RunFailed, RuntimeError):
    """A checkpoint could not be saved or restored; the message names it and the fix."""


class NonFiniteState(CheckpointError):
    """A state with non-finite parameters or optimizer moments was refused by `save`."""


class CheckpointMismatch(UsageError, CheckpointError):
    """A good checkpoint that this run's config cannot continue (another model shape, batch
    size): a usage error (exit 2), fixed in the config or with a new workdir."""


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
        for f, state in zip(files, states, strict=True):
            if not isinstance(state, dict) or not isinstance(state.get("rows"), dict):
                raise MalformedDataState(f"{f.name} is not a data-iterator state")
        if len({s.get("batch_size") for s in states}) != 1:
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


def _preservation(cfg: CheckpointConfig) -> policies.AnyPreservationPolicy:
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
    return policies.AnyPreservationPolicy(keep)


# Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>` and commits it by renaming that
# to `<step>` (on local and network filesystems, which are what bigjax checkpoints to).
STAGING = ".orbax-checkpoint-tmp"


class Checkpointer:
    """One run's saves: owns Orbax's CheckpointManager (retention, async writes), the step
    being written, and sealing (checksums committed with each step, `integrity`). Restores
    read `self.manager` through the functions below."""

    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.async_save = cfg.async_save
        self.in_flight: int | None = None  # the step of the last save started
        self._started = time.time()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the loop decides; Orbax saves what it is asked to
            preservation_policy=_preservation(cfg),
            enable_async_checkpointing=cfg.async_save,
            async_options=(
                ocp.AsyncOptions(
                    post_finalization_callback=self._seal_before_commit,
                    # The step's directories are made in `save`, on the loop's thread (a few
                    # mkdirs): made in the background, a directory that cannot be created
                    # left Orbax waiting for a signal that never came, for minutes, then
                    # hanging exit.
                    create_directories_asynchronously=False,
                )
                if cfg.async_save
                else None
            ),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self,
        state: TrainState,
        data_iter: Batches | None,
        meta: dict[str, Any],
        *,
        force: bool = False,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts a (possibly async) save at `state.step`; returns whether one was started.

        A failure of an earlier async save surfaces here (Orbax re-raises it on the next
        call)."""
        step = int(jax.device_get(state.step))
        if not integrity.state_finite((state.params, state.opt_state)):
            raise NonFiniteState(
                f"step {step}: parameters or optimizer moments are not finite; not saved (the "
                "last good checkpoint stays the newest). Lower optim.lr or keep "
                "optim.clip_norm on."
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=DataSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        # Orbax waits for the previous async save before it starts this one and re-raises its
        # failure then; waiting here first (no extra wait) names that step, not this one.
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise _save_error(self.manager, self.in_flight, e) from e
        try:
            self.in_flight = step
            started = self.manager.save(step, args=args, force=force, metrics=metrics)
        except Exception as e:
            raise _save_error(self.manager, step, e) from e
        if started and not self.async_save:
            self._seal_committed()
        return started

    def wait(self) -> None:
        """Blocks until pending async saves are committed; raises CheckpointError if one
        failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise _save_error(self.manager, self.in_flight, e) from e
        self._seal_committed()  # async steps are sealed before their commit; a fallback

    def close(self) -> None:
        """Lets Orbax finish or abandon its background writes, on the way out. A failure of a
        save still in flight is not raised here: a run that ends normally has waited for its
        saves (`wait` reports a failure), and one that ends by an error reports that error,
        not a save it cut short."""
        with contextlib.suppress(Exception):
            self.manager.close()

    def _seal_before_commit(self) -> None:
        """Orbax calls this on the primary process in its background thread once every
        process has written the step, just before the rename that commits it: the checksums
        go into the staging directory and are committed with the step (off the loop's path).
        If sealing fails, the step is not committed and the save reports the failure."""
        staged = [p for p in self.directory.glob(f"{self.in_flight}{STAGING}*") if p.is_dir()]
        if jax.process_index() == 0 and len(staged) == 1:
            integrity.seal(staged[0])

    def _seal_committed(self) -> None:
        """Checksums of committed steps this run wrote that have none: synchronous saves
        (Orbax calls back only for async ones), right after their commit. Steps from before
        this run started are never sealed: a step is only vouched for by the process that
        wrote it."""
        if jax.process_index() != 0:
            return
        for step_dir in self.directory.iterdir() if self.directory.is_dir() else ():
            try:
                fresh = step_dir.name.isdigit() and step_dir.stat().st_mtime >= self._started - 1
                if fresh and not integrity.is_sealed(step_dir):
                    integrity.seal(step_dir)
            except FileNotFoundError:  # deleted by the retention policy meanwhile
                continue


def _save_error(manager: ocp.CheckpointManager, step: int | None, e: Exception) -> CheckpointError:
    """One line: which step, where, why, and the fix (for a full disk, how much it needs)."""
    directory = Path(manager.directory)
    cause = f"{type(e).__name__}: {_first_line(e)}"
    if not _disk_full(e):
        return CheckpointError(
            f"saving a checkpoint (step {step}) in {directory} failed ({cause}). Check free "
            "disk space and write permissions there."
        )
    sizes = {s: _tree_bytes(directory / str(s)) for s in manager.all_steps()}
    need = max(sizes.values(), default=0)
    free = shutil.disk_usage(directory).free
    committed = sorted(sizes)
    text = (
        f"saving a checkpoint (step {step}) in {directory} failed: no free disk space "
        f"({_human(free)} free; a save needs about {_human(need)}, the size of the last one)."
    )
    if len(committed) > 1:
        freed = sum(sizes[s] for s in committed[:-1])
        text += (
            f" checkpoint.keep=1 would keep only the newest and free {_human(freed)} "
            f"(now {len(committed)} steps are kept); or free space there."
        )
    return CheckpointError(text + " Older checkpoints are intact; rerun to resume.")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "RESOURCE_EXHAUSTED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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


def restore(
    manager: ocp.CheckpointManager,
    target: TrainState,
    data_iter: Batches | None,
    layout: dict[str, list[int]],
    *,
    move_corrupt: bool = True,
    config: Mapping[str, object] | None = None,
    layer_order: Sequence[int] | None = None,
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
    bigjax/stages.py; None: the model's), whatever order the checkpoint recorded.
    """
    directory = Path(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        step_dir = directory / str(step)
        # Its bytes first: nothing of a step, its metadata included, is read before its
        # checksums pass, so a flipped bit is never taken for a change of config.
        problem = integrity.verify(step_dir)
        restored = None
        if problem is None:
            warn_if_unsealed(step_dir)
            if read_meta(manager, step).get("params_only"):
                raise CheckpointError(
                    f"{directory} holds parameters only (an imported model), not a training "
                    "state to resume: train from it in a new run with "
                    f"--config.checkpoint.init_from={directory.parent}."
                )
            check_config(manager, step, config, layout)
            try:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        data=DataRestore(data_iter),
                    ),
                )["state"]
            except DataStateError as e:  # readable, but this config cannot continue it
                raise CheckpointMismatch(f"checkpoint {step_dir}: {e}") from e
            except Exception as e:  # corrupt or truncated files, a malformed data state
                if integrity.is_sealed(step_dir) and not isinstance(e, MalformedDataState):
                    # Its bytes are the ones written: this run's state is what differs.
                    raise CheckpointMismatch(
                        f"checkpoint {step_dir} is intact (its checksums match) but does not "
                        f"restore into this run's state ({type(e).__name__}: {_first_line(e)}"
                        "): the config changed what the state holds (optimizer, fine-tuning "
                        "setup). Set it back, or start a new --workdir with "
                        f"--config.checkpoint.init_from={directory.parent} "
                        "--config.checkpoint.init_mode=params."
                    ) from e
                problem = f"unreadable: {type(e).__name__}: {_first_line(e)}"
        if restored is not None and not integrity.state_finite(
            (restored.params, restored.opt_state)
        ):
            problem = "its parameters or optimizer moments are not finite"
        if problem is None and restored is not None:
            saved_order = read_meta(manager, step).get("layer_order")
            return stages.reorder(restored, saved_order, layer_order)
        failures.append(f"{step_dir}: {problem}")
        where = ""
        if move_corrupt:
            where = f"; moved to {integrity.quarantine(step_dir)}"
            manager.reload()
        warnings.warn(
            f"checkpoint {step_dir} is unreadable or corrupt ({problem}){where}; falling back "
            "to the previous one.",
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


def warn_if_unsealed(step_dir: Path) -> None:
    if not integrity.is_sealed(step_dir):
        warnings.warn(
            f"checkpoint {step_dir} has no checksums: it was written by a bigjax that did not "
            "keep them, or by a synchronous save (checkpoint.async_save=false) whose process "
            "died between its commit and its checksums; using it unverified.",
            stacklevel=3,
        )


def _first_line(e: Exception) -> str:
    """The message of `e` up to its first line break (Orbax appends pages of metadata)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def param_layout(abstract_params: Params) -> dict[str, list[int]]:
    """Parameter path -> shape: saved with every checkpoint, checked on every restore."""
    return {
        path_name(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
