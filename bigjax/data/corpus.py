"""The built-in corpus: this interpreter's standard-library sources, as byte-range documents."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
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
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    ]
    if not files:
        raise FileNotFoundError(
            f"no standard-library sources under {root}: this Python was installed without "
            "them. Install a full CPython (e.g. via pyenv) or use a prepared dataset."
        )
    return sorted(files)


def is_held_out(path: Path, root: Path, eval_fraction: float) -> bool:
    """Stable train/eval split by a hash of the relative path (independent of file order)."""
    digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def documents(files: list[Path], chunk_bytes: int) -> list[Document]:
    """Cuts files into chunks of at most `chunk_bytes`, so that a global shuffle of documents
    mixes the whole corpus into every batch instead of streaming one long file at a time."""
    out = []
    for path in files:
        size = os.path.getsize(path)
        out.extend(
            Document(str(path), start, min(start + chunk_bytes, size), size)
            for start in range(0, size, chunk_bytes)
        )
    return out


def split_stdlib(eval_fraction: float, chunk_bytes: int) -> tuple[list[Document], list[Document]]:
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
