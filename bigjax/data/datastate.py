"""A saved data-iterator state, as a run that continues it must find it: its two errors, the
check of its form, and the check that its sources hold the data they held when it was saved.

A state names each source it read (as the config names it: data.path, each data.mixture
path, data.examples, data.images, or the built-in corpus) with a digest of its data. A
resume whose config names a source alike but finds other data under it (a dataset prepared
again at its path, an examples file edited, another Python's standard library) would go on
at the saved positions of other records without a sign: it is refused. A source renamed in
the config is a deliberate switch, which the run's config history records, and goes on.
"""

from __future__ import annotations

from typing import Any

Digests = dict[str, str]  # a source, as the config names it (data.path, ...) -> its digest
BUILTIN = "the built-in corpus"


class DataStateError(ValueError):
    """A saved data-iterator state that this run's data config cannot continue."""


class MalformedDataState(ValueError):
    """A saved data-iterator state that is not one this pipeline writes (corrupt, edited)."""


def check_sources(saved: object, ours: Digests) -> None:
    """Raises DataStateError naming each source the saved state (its `data` digests) and this
    run name alike whose data differ. A state saved before digests were kept (None) has
    nothing to compare."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise MalformedDataState(f"its 'data' is {type(saved).__name__}, not a mapping")
    changed = [k for k in ours if k in saved and saved[k] != ours[k]]
    if changed:
        raise DataStateError(
            f"{', '.join(map(repr, changed))} changed since this state was saved (prepared "
            "again, edited, or for the built-in corpus another Python's library): the saved "
            "data order would go on at the positions of other records. Resume on the data "
            "it was saved with; to go on with the new data, give it a new name in the config "
            "(another data.path, data.examples or data.images: a switch the run's "
            "config_history.jsonl records), or start a new run with checkpoint.init_from."
        )


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
