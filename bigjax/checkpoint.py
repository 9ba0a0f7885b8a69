"""Orbax checkpoints: train state + data-iterator state + run metadata, saved asynchronously.

Integrity comes from Orbax's atomic commit: a step is written to a temporary directory and
renamed into place when complete, so a save killed mid-write is never listed; each committed
step is then sealed with checksums (bigjax/integrity.py). This module writes; reading a
checkpoint back (resume, `init_from`, the tools' loaders) is bigjax/loading.py. Nothing here
unpickles: the state is tensorstore arrays, the data-iterator state and the metadata are JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from bigjax import errors, integrity
from bigjax.config import CheckpointConfig
from bigjax.data.datastate import DataStateError, MalformedDataState
from bigjax.data.pipeline import Batches
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


class UnreadablePath(UsageError, CheckpointError):
    """A checkpoint directory whose path Orbax cannot use: one it could write but not read back,
    or a name that is not UTF-8."""


def has_steps(directory: Path) -> bool:
    """Whether a run's checkpoints folder holds a step to resume, or steps set aside as
    corrupt (over which a resume refuses to start afresh): the run is not a new one."""
    steps = [p for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return bool(steps or integrity.set_aside(directory))


def check_path(directory: Path) -> Path:
    """`directory`, if Orbax can read checkpoints back from it. Orbax finds a checkpoint's
    parts with glob patterns built from its whole path (its local-file paths glob unescaped),
    so a folder named like `run[1]` (`[1]` is a character class: it matches `run1`, not
    itself) was saved but never restored, the error blaming the config. `*` and `?` match
    themselves, and are left alone. A name that is not UTF-8 is refused too: TensorStore takes
    UTF-8 paths only, and failed at the first save with a C++ cast error; and so is one with a
    backslash, which TensorStore reads as a separator when it restores."""
    if shown := errors.not_utf8(directory):
        raise UnreadablePath(
            f"{shown}: a name that is not UTF-8; TensorStore, which writes the checkpoints, "
            "takes UTF-8 paths only. Rename it, or choose another directory."
        )
    for part in Path(directory).absolute().parts:
        if "\\" in part:  # saved into `run\back`, read back from run/back: "config changed"
            raise UnreadablePath(
                f"{directory}: TensorStore, which reads the checkpoints back, takes a backslash "
                f"in a path for a separator ({part!r} as {part.replace(chr(92), '/')!r}), so "
                "checkpoints saved here would not restore. Rename that folder (no \\) or "
                "choose another directory."
            )
        if not fnmatch.fnmatchcase(part, part):
            raise UnreadablePath(
                f"{directory}: Orbax could save checkpoints here but not restore them: it "
                f"reads them back through glob patterns built from the path, and in {part!r} "
                "the brackets are a pattern that does not match the name. Rename that folder "
                "(no [ ]) or choose another directory."
            )
    return directory


class DataHandler(ocp.CheckpointHandler):
    """The data iterator's state as JSON. Each process writes the batch rows it owns; a restore
    merges every process's file, so a checkpoint written by P processes resumes on any number
    (the state is per global batch row, see `pipeline.Batches`)."""

    def save(self, directory: Path, args: DataSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (Path(directory) / name).write_text(json.dumps(args.item.get_state()), encoding="utf-8")

    def restore(self, directory: Path, args: DataRestore) -> Any:
        files = sorted(Path(directory).glob("process_*-of-*.json"))
        if not files:
            raise FileNotFoundError(f"no data-iterator state in {directory}")
        states = [json.loads(f.read_text(encoding="utf-8")) for f in files]
        for f, state in zip(files, states, strict=True):
            if not isinstance(state, dict) or not isinstance(state.get("rows"), dict):
                raise MalformedDataState(f"{f.name} is not a data-iterator state")
        if len({s.get("batch_size") for s in states}) != 1:
            raise ValueError(f"the data states in {directory} disagree on the batch size")
        rows = {row: s for state in states for row, s in state["rows"].items()}
        try:
            args.item.set_state({**states[0], "rows": rows},
                                restart_other_data=args.restart_other_data)  # fmt: skip
        except DataStateError as e:
            # Returned, not raised: this process's data may be what differs, and a raise here
            # skips the barrier Orbax's restore ends with, where the others then wait (and
            # abort). The caller decides on every process together (loading.restore).
            return e
        return args.item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any
    restart_other_data: bool = False  # see `pipeline.Batches.set_state`


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
        self.directory = check_path(Path(directory).absolute())
        if self.directory.exists() and not self.directory.is_dir():  # found now, not at a save
            raise CheckpointError(f"{self.directory} is a file, not a directory of checkpoints; "
                                  "move it away and run again.")  # fmt: skip
        self.async_save = cfg.async_save
        self.in_flight: int | None = None  # the step of the last save started
        self.state_bytes = 0  # of the last state saved: a first save's size, if it fails
        self._ours: set[int] = set()  # the steps this run saved: the only ones it may seal
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
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
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
            raise _save_error(self.manager, self.in_flight, e, self.state_bytes) from e
        try:
            self.in_flight = step
            started = self.manager.save(step, args=args, force=force, metrics=metrics)
        except Exception as e:
            raise _save_error(self.manager, step, e, self.state_bytes) from e
        if started:
            self._ours.add(step)
        if started and not self.async_save:
            self._seal_committed()
        return started

    def wait(self) -> None:
        """Blocks until pending async saves are committed; raises CheckpointError if one
        failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise _save_error(self.manager, self.in_flight, e, self.state_bytes) from e
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
        wrote it. Which steps those are is recorded, not read from modification times (on a
        network file system those are the server's clock: 2 s behind, a step went unsealed)."""
        if jax.process_index() != 0:
            return
        for step in sorted(self._ours):
            step_dir = self.directory / str(step)
            try:
                if not step_dir.is_dir():
                    continue  # not committed, or deleted by the retention policy
                if not integrity.is_sealed(step_dir):
                    integrity.seal(step_dir)
                self._ours.discard(step)  # sealed: nothing left to do for it
            except FileNotFoundError:  # deleted by the retention policy meanwhile
                self._ours.discard(step)


def _save_error(
    manager: ocp.CheckpointManager, step: int | None, e: Exception, state_bytes: int
) -> CheckpointError:
    """One line: which step, where, why, and the fix (for a full disk, how much it needs: the
    last checkpoint's size, or the state's before the first)."""
    directory = Path(manager.directory)
    cause = f"{type(e).__name__}: {first_line(e)}"
    if not _disk_full(e):
        return CheckpointError(
            f"saving a checkpoint (step {step}) in {directory} failed ({cause}). Check free "
            "disk space and write permissions there."
        )
    sizes = {s: _tree_bytes(directory / str(s)) for s in manager.all_steps()}
    need = max(sizes.values(), default=0)
    what = "the size of the last one" if need else "the size of the state"
    free = shutil.disk_usage(directory).free
    committed = sorted(sizes)
    text = (
        f"saving a checkpoint (step {step}) in {directory} failed: no free disk space "
        f"({_human(free)} free; a save needs about {_human(need or state_bytes)}, {what})."
    )
    if len(committed) > 1:
        freed = sum(sizes[s] for s in committed[:-1])
        text += (
            f" checkpoint.keep=1 would keep only the newest and free {_human(freed)} "
            f"(now {len(committed)} steps are kept); or free space there."
        )
    if not committed:  # a failed first save: there is nothing to resume from
        return CheckpointError(text + " No checkpoint was written; free space there and rerun.")
    return CheckpointError(text + " Older checkpoints are intact; rerun to resume.")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _disk_full(e: BaseException | None) -> bool:
    # in a save, tensorstore's RESOURCE_EXHAUSTED is the disk (elsewhere it can be memory)
    return errors.disk_full(e, (*errors.FULL_DISK, "RESOURCE_EXHAUSTED"))


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def first_line(e: Exception) -> str:
    """The message of `e` up to its first line break (Orbax appends pages of metadata)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def param_layout(abstract_params: Params) -> dict[str, list[int]]:
    """Parameter path -> shape: saved with every checkpoint, checked on every restore."""
    return {
        path_name(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
