"""The built-in corpus: this interpreter's standard-library sources, as byte-range documents."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import os
import sysconfig
import typing
from collections.abc import Sequence
from pathlib import Path

from bigjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Document:
    """Bytes [start, end) of one file. `first`/`last` mark the file's own start and end."""

    path: str
    start: int
    end: int
    size: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.size


def stdlib_files() -> list[Path]:
    """Every .py file of the running interpreter's standard library (not site-packages)."""
    return list(_stdlib_files())


@functools.cache  # the interpreter's own sources do not change while it runs
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        # Installed packages are not the standard library, and are never entered: under a
        # pyenv Python, site-packages can hold far more files than the library (0.9 s to walk)
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages"))
        files += [Path(directory, n) for n in names if n.endswith(".py")]
    if not files:
        raise FileNotFoundError(
            f"no standard-library sources under {root}: this Python was installed without "
            "them. Install a full CPython (e.g. via pyenv) or use a prepared dataset."
        )
    return tuple(sorted(files))


def is_held_out(path: Path, root: Path, eval_fraction: float) -> bool:
    """Stable train/eval split by a hash of the relative path (independent of file order)."""
    digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


@dataclasses.dataclass(frozen=True)
class Documents(Sequence[Document]):
    """Files cut into chunks of at most `chunk_bytes`, so that a global shuffle of documents
    mixes the whole corpus into every batch instead of streaming one long file at a time.

    A sequence computed on access: the stdlib cut at a short row length is ~500k chunks, and
    building (then pickling to every Grain worker) that many objects cost seconds per run.
    Holds only each file's path and size; chunk i is found by bisection over the counts."""

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    chunk_bytes: int
    ends: tuple[int, ...] = dataclasses.field(init=False, repr=False)  # cumulative chunk counts

    def __post_init__(self) -> None:
        counts = (-(-size // self.chunk_bytes) for size in self.sizes)
        object.__setattr__(self, "ends", tuple(itertools.accumulate(counts)))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    @typing.overload
    def __getitem__(self, index: int) -> Document: ...
    @typing.overload
    def __getitem__(self, index: slice) -> list[Document]: ...
    def __getitem__(self, index: int | slice) -> Document | list[Document]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        index %= len(self)
        file = bisect.bisect_right(self.ends, index)
        start = (index - (self.ends[file - 1] if file else 0)) * self.chunk_bytes
        size = self.sizes[file]
        return Document(self.paths[file], start, min(start + self.chunk_bytes, size), size)


def documents(files: Sequence[Path], chunk_bytes: int) -> Documents:
    """Every file as chunks of at most `chunk_bytes` (empty files give none), in file order."""
    return Documents(
        tuple(str(p) for p in files), tuple(os.path.getsize(p) for p in files), chunk_bytes
    )


def stdlib_digest() -> str:
    """Names the built-in corpus by its files (below the library's root) and their sizes: a
    resume under another Python, whose library is another corpus, is caught by it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(str(p.relative_to(root)), os.path.getsize(p)) for p in stdlib_files()]
    return hashlib.sha256(repr(files).encode("utf-8")).hexdigest()[:16]


@functools.cache  # pure in its arguments while the interpreter runs (train and eval both ask)
def split_stdlib(eval_fraction: float, chunk_bytes: int) -> tuple[Documents, Documents]:
    """(train, eval) documents of the built-in corpus."""
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    held = [is_held_out(p, root, eval_fraction) for p in files]
    train = documents([p for p, h in zip(files, held, strict=True) if not h], chunk_bytes)
    evals = documents([p for p, h in zip(files, held, strict=True) if h], chunk_bytes)
    if not train or not evals:
        raise ConfigError(
            f"data.eval_fraction: {eval_fraction} leaves an empty split of the built-in "
            "corpus; pick a value between 0.001 and 0.5."
        )
    return train, evals
