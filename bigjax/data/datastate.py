"""A saved data-iterator state, as a run that continues it must find it: its two errors, the
check of its form, the check that its sources hold the data they held when it was saved, and
the batch layouts it goes on under (another batch size or packing is refused; another row
length goes on, where the packing allows, at the token each row stopped at).

A state names each source it read (as the config names it: data.path, each data.mixture
path, data.examples, data.images, or the built-in corpus) with a digest of its data. A
resume whose config names a source alike but finds other data under it (a dataset prepared
again at its path, an examples file edited, another Python's standard library) would go on
at the saved positions of other records without a sign: it is refused. A new run from the
state (`checkpoint.init_from`, 'full') reads such a source from its beginning, with a
warning. A source renamed in the config is a deliberate switch, which the run's config
history records, and goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, TypedDict

import grain

from bigjax.errors import BigjaxWarning

Digests = dict[str, str]  # a source, as the config names it (data.path, ...) -> its digest
BUILTIN = "the built-in corpus"


class DataStateError(ValueError):
    """A saved data-iterator state that this run's data config cannot continue."""

    def for_run(self, run: object) -> DataStateError:
        """The error with its way out naming the run's directory, once the caller knows it."""
        return self


class MalformedDataState(ValueError):
    """A saved data-iterator state that is not one this pipeline writes (corrupt, edited)."""


def changed_sources(saved: object, ours: Digests) -> list[str]:
    """The sources the saved state (its `data` digests) and this run name alike whose data
    differ. A state saved before digests were kept (None) has nothing to compare."""
    if saved is None:
        return []
    if not isinstance(saved, dict):
        raise MalformedDataState(f"its 'data' is {type(saved).__name__}, not a mapping")
    return [repr(k) for k in ours if k in saved and saved[k] != ours[k]]


class OtherData(DataStateError):
    """The refusal of a resume on other data under the names `changed`, with the way out
    for the `run` (its directory, once the caller knows it)."""

    def __init__(self, changed: list[str], run: object = "RUN"):
        self.changed = changed
        super().__init__(
            f"{', '.join(changed)} changed since this state was saved (prepared again, "
            "edited, or for the built-in corpus another Python's library): the saved data "
            "order would go on at the positions of other records. Resume on the data it was "
            "saved with. To go on with the new data, start a new --workdir from this run with "
            f"--config.checkpoint.init_from={run} --config.checkpoint.init_mode=full (its "
            "whole state; the new data read from its beginning), or name the data anew in "
            "this run's config (another data.path: a switch config_history.jsonl records; "
            "the saved data order goes on there)."
        )

    def for_run(self, run: object) -> OtherData:
        return OtherData(self.changed, run)


def continues(saved: object, ours: Digests, *, restart_other_data: bool) -> bool:
    """Whether a saved data order goes on: its sources (the state's `data`) hold the data
    they held. If not, a resume is refused, or with `restart_other_data` (a new run from
    another's whole state) a warning names them and their data is read from its beginning."""
    changed = changed_sources(saved, ours)
    if changed and restart_other_data:
        warnings.warn(f"{', '.join(changed)}: other data than the saved data order was of; it "
                      "is read from its beginning (the state is taken whole).", BigjaxWarning,
                      stacklevel=3)  # fmt: skip
    elif changed:
        raise OtherData(changed)
    return not changed


def state_shape(x: Any) -> Any:
    """The structure of an iterator state with its leaves as type names, for comparing a
    saved state with the one this pipeline writes. Counters must be >= -1 (Grain's -1 marks
    an empty slice), else the state is not one a pipeline wrote."""
    if isinstance(x, dict):
        return {k: state_shape(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):  # a tuple in memory is a list after JSON
        return [state_shape(v) for v in x]
    if isinstance(x, int) and not isinstance(x, bool):
        return "int" if x >= -1 else "negative int"
    return type(x).__name__


def as_written(saved: Any, template: Any) -> Any:
    """A state read back from JSON, with the tuples JSON turned into lists made tuples again
    wherever a fresh iterator's state (`template`, of the same structure) has one.

    Grain's concat-then-split packer tests `remainder_slices[f] != (-1, -1)` to decide
    whether a document is half-packed; after a JSON round trip `[-1, -1]` passes that test,
    and the restored iterator takes the next document for an empty remainder: it is dropped
    and the data order silently changes (docs/data.md has a Grain-only reproduction).
    """
    if isinstance(template, dict):
        return {k: as_written(v, template.get(k)) for k, v in saved.items()}
    if isinstance(template, (list, tuple)) and isinstance(saved, (list, tuple)):
        items = [as_written(v, t) for v, t in zip(saved, template, strict=True)]
        return tuple(items) if isinstance(template, tuple) else items
    return saved


class OtherLayout(DataStateError):
    """The refusal of a resume under a batch layout its data order cannot go on in."""

    def __init__(self, problem: str, keep: str, run: object = "RUN"):
        self.problem, self.keep = problem, keep
        super().__init__(
            f"the data state was saved with {problem}: the data order cannot continue. Keep "
            f"the {keep}, or start a new --workdir from this run with --config.checkpoint."
            f"init_from={run} --config.checkpoint.init_mode=full (its whole state; the data "
            "read from its beginning)."
        )

    def for_run(self, run: object) -> OtherLayout:
        return OtherLayout(self.problem, self.keep, run)


def layout_change(
    state: Mapping[str, object], batch_size: int, seq_len: int, packing: str, *, restart: bool
) -> int | None:
    """Whether a saved order goes on under this batch layout: 0 as it is, the saved row length
    when the rows' states must be cut again at ours (`recut`). Where it cannot, a resume is
    refused, or with `restart` (a new run from another's whole state) a warning says so and
    None reads the data from its beginning. Packing is '' for rows that pack nothing (images).
    A state saved before the packing and row length were recorded is taken as it is."""
    problem, keep, saved_len = None, "", state.get("seq_len")
    if saved_len is not None and (type(saved_len) is not int or saved_len < 1):  # not a bool
        raise MalformedDataState(f"its seq_len is {saved_len!r}, not a row length")
    if (saved := state.get("batch_size")) != batch_size:
        problem, keep = f"data.batch_size={saved}, this run has {batch_size}", "batch size"
    elif (saved := state.get("packing")) not in (None, packing):
        problem = f"data.packing={saved!r}, this run has {packing!r} (each keeps its own state)"
        keep = "packing"
    elif saved_len in (None, seq_len) or packing in ("", "pad"):
        return 0  # pad: a row is one document, whatever its length
    elif packing == "first_fit":
        problem = (f"data.seq_len={saved_len}, this run has {seq_len}: first-fit packing holds a "
                   "window of documents cut into rows of the saved length")  # fmt: skip
        keep = "row length (data.packing concat and pad go on at another)"
    if problem is None:
        return saved_len  # concat: each row's state cut again at this run's length
    if not restart:
        raise OtherLayout(problem, keep)
    warnings.warn(f"the data state was saved with {problem}: the data is read from its "
                  "beginning (the state is taken whole).", BigjaxWarning, stacklevel=3)  # fmt: skip
    return None


EMPTY = (-1, -1)  # Grain's concat packer: no document in hand


class ConcatState(TypedDict):
    """A row's state in Grain's concat-then-split packer (see `recut`)."""

    parent_state: dict[str, Any]  # the documents' iterator's
    remainder_slices: dict[str, tuple[int, int]]  # a feature -> the part not yet packed
    elements_from_buffer_after_checkpoint: int  # rows packed since that point


def recut(state: ConcatState, docs: grain.DatasetIterator, row_tokens: int) -> ConcatState:
    """A concat packer's row state, saved at rows of `row_tokens` tokens, as the state of the
    same position that rows of any length go on from exactly.

    Grain's concat-then-split state is: the documents' iterator state before the document in
    hand, the part of that document not yet packed (EMPTY for none), and the rows packed
    since, which a restore packs again at its own row length: at another length that moves
    the position, and tokens were read twice or skipped. Here the position after those rows
    is found by walking the documents' lengths (`docs`: a fresh iterator of the row's
    documents), and the state points at it with no rows to pack again."""
    todo = row_tokens * state["elements_from_buffer_after_checkpoint"]
    if todo < 0:  # -1 passes the form check (Grain's empty slice); as a count, an edit
        raise MalformedDataState("a row's packed-rows count is negative")
    if todo == 0:
        return state
    before, slices = state["parent_state"], state["remainder_slices"]
    docs.set_state(before)
    length = lambda doc: len(doc[next(iter(slices))])  # noqa: E731 -- features cut alike
    start, end = next(iter(slices.values()))
    if (start, end) == EMPTY:
        start, end = 0, length(next(docs))
    else:
        next(docs)
    while todo >= end - start:
        todo -= end - start
        before = docs.get_state()
        start, end = 0, length(next(docs))
    start += todo
    left = EMPTY if start == 0 else (start, end)
    return ConcatState(parent_state=before, remainder_slices=dict.fromkeys(slices, left),
                       elements_from_buffer_after_checkpoint=0)  # fmt: skip
