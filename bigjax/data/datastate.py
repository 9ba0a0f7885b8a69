"""A saved data-iterator state, as a run that continues it must find it: its two errors, the
check of its form, and the check that its sources hold the data they held when it was saved.

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
from typing import Any

from bigjax.errors import BigjaxWarning

Digests = dict[str, str]  # a source, as the config names it (data.path, ...) -> its digest
BUILTIN = "the built-in corpus"


class DataStateError(ValueError):
    """A saved data-iterator state that this run's data config cannot continue."""


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
