"""A data.mixture whose weights change mid-run (an annealing): every source goes on where it was.

Grain's mix maps each position of the mixed order to (source, position in that source) by the
weights alone. A resume at the same position under other weights would go on at other
positions of every source: documents of a source given more weight skipped, those of one
given less read again (from 0.5/0.5 to 0.9/0.1 after 10,000 documents: 4,000 of each). So a
mixture's order is kept in segments: the state holds, per source, where the current weights'
order begins in it (`offsets`); when the weights change, the new segment begins at each
source's first document that the rows had not all read. Rows start the new segment afresh:
what faster rows had read beyond the slowest row's position, and each row's document in
hand, is read again, once (docs/reliability.md has the measurement).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import TypeGuard

import grain

from bigjax.data.datastate import MalformedDataState
from bigjax.errors import BigjaxWarning


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Sources (each an endless document order), mixed by `weights`, each read from its
    position `offsets[k]` on."""

    names: tuple[str, ...]  # the sources as the config names them (data.mixture's paths)
    streams: tuple[grain.MapDataset, ...]
    weights: tuple[float, ...]
    offsets: tuple[int, ...]

    def docs(self) -> grain.MapDataset:
        # offsets 0: Grain's mix of the sources as they are (the order runs always had)
        parts = [s[o:] if o else s for s, o in zip(self.streams, self.offsets, strict=True)]
        return grain.MapDataset.mix(parts, list(self.weights))

    def state(self) -> dict[str, list]:
        return {"names": list(self.names), "weights": list(self.weights),
                "offsets": list(self.offsets)}  # fmt: skip

    def going_on_from(
        self, saved: Mapping[str, object], rows: Mapping[str, object]
    ) -> tuple[Mixture, bool]:
        """This mixture going on from a saved one's state (`rows`: every row's iterator state),
        and whether its rows start afresh: at the saved offsets under the same weights; under
        other weights, a new segment from the first position some row had not read. Sources
        named otherwise than saved (added, removed, reordered) go on as Grain's mix places
        them. A state that is not a mixture's is a MalformedDataState."""
        names, weights, offsets = (saved.get(k) for k in ("names", "weights", "offsets"))
        if not (_all(names, str) and _all(weights, (int, float)) and _all(offsets, int)):
            raise MalformedDataState(f"its mixture {str(dict(saved))[:200]} is not one")
        if names != list(self.names):
            warnings.warn(
                f"data.mixture: the data state was saved with sources {names}, this run reads "
                f"{list(self.names)}: the mixed order goes on at the positions Grain's mix "
                "gives the new list, so documents of a source are skipped or read again until "
                "its epoch ends. Keep the sources and change their weights to go on where each "
                "was.", BigjaxWarning, stacklevel=4)  # fmt: skip
            return self, False
        if len(weights) != len(names) or len(offsets) != len(names) or min(offsets) < 0:
            raise MalformedDataState(f"its mixture {dict(saved)} is not one a source each")
        if _proportions(weights) == _proportions(self.weights):  # 0.5/0.5 is 1/1: goes on
            kept = tuple(float(w) for w in weights)  # the saved mix, to the last rounding
            return dataclasses.replace(self, weights=kept, offsets=tuple(offsets)), False
        read = consumed(weights, first_unread(rows))
        offsets = [o + n for o, n in zip(offsets, read, strict=True)]
        return dataclasses.replace(self, offsets=tuple(offsets)), True


def _all(value: object, kind: type | tuple[type, ...]) -> TypeGuard[list]:
    """Whether `value` is a list of `kind` (a JSON list read back), bools not numbers."""
    return isinstance(value, list) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    )


def _proportions(weights: Sequence[float]) -> list[float]:
    """Weights as fractions of the largest, to 9 digits: what decides the mix (a sum of
    weights near the float limit would overflow to inf and make every mix look alike)."""
    return [round(w / max(weights), 9) for w in weights]


def first_unread(rows: Mapping[str, object]) -> int:
    """The first position of the mixed order that some row had not read: row r reads
    positions r, r+B, r+2B, ... (B rows), and its state's innermost `next_index` counts the
    documents it had begun (a packer's document in hand is not read through)."""
    batch = len(rows)
    return min(int(r) + (_next_index(state) or 0) * batch for r, state in rows.items())


def _next_index(state: object) -> int | None:
    """The innermost `next_index` of a row's nested iterator state: its documents'."""
    if not isinstance(state, dict):
        return None
    for inner in state.values():
        if (found := _next_index(inner)) is not None:
            return found
    found = state.get("next_index")
    return found if isinstance(found, int) else None


def consumed(weights: Sequence[float], position: int) -> list[int]:
    """How many documents of each source the first `position` of Grain's mix under `weights`
    hold: read off the mix of index-only sources (no document is read), walking back from
    `position` until each source has been seen."""
    tagged = [grain.MapDataset.range(sys.maxsize).map(functools.partial(_tag, k))
              for k in range(len(weights))]  # fmt: skip
    mixed = grain.MapDataset.mix(tagged, list(weights))
    counts: list[int | None] = [None] * len(weights)
    at = position - 1
    while at >= 0 and None in counts:
        source, index = mixed[at]
        if counts[source] is None:
            counts[source] = index + 1
        at -= 1
    return [c or 0 for c in counts]


def _tag(source: int, index: int) -> tuple[int, int]:
    return source, index
