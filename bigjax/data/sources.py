"""Raw documents from input files: text files, JSONL (plain, gzip, zstd), Parquet, the stdlib.

Readers stream: memory stays bounded by one line (JSONL), one batch (Parquet) or one file
(text). A record that cannot be used is yielded with a `skip` reason, so the caller counts it
(or, with --strict, stops at it) instead of losing it silently.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from bigjax.data.corpus import stdlib_files

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclasses.dataclass(frozen=True)
class RawDoc:
    """One input document, or the reason it was skipped (`text` is then None)."""

    source: str
    line: int  # 1-based line in a JSONL file, row in a Parquet file, 0 for a whole file
    text: str | None
    skip: str | None = None
    repaired_utf8: bool = False


class DataError(ValueError):
    """Input that cannot be prepared; the message names the file (and line) and the fix."""


def _kind(path: Path) -> str:
    name = path.name.lower()
    for suffixes, kind in (
        (JSONL_SUFFIXES, "jsonl"),
        (PARQUET_SUFFIXES, "parquet"),
        (TEXT_SUFFIXES, "text"),
    ):
        if name.endswith(suffixes):
            return kind
    raise DataError(f"{path}: unsupported file type; supported: {', '.join(SUPPORTED)}.")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Globs (recursive `**` allowed) and 'stdlib', sorted within each pattern, de-duplicated."""
    out: list[Path] = []
    for pattern in patterns:
        if pattern == "stdlib":
            matches = stdlib_files()
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise DataError(f"--input {pattern!r}: no such file (nothing matches).")
        for path in matches:
            _kind(path)
            if path not in out:
                out.append(path)
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode(data: bytes, invalid_utf8: str) -> tuple[str | None, bool]:
    """(text, repaired); text is None when invalid bytes are to be dropped."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        if invalid_utf8 == "drop":
            return None, False
        return data.decode("utf-8", errors="replace"), True


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _read_text_file(path: Path, invalid_utf8: str) -> Iterator[RawDoc]:
    data = path.read_bytes()
    if not data.strip():
        yield RawDoc(str(path), 0, None, "empty_file")
        return
    text, repaired = _decode(data, invalid_utf8)
    yield RawDoc(str(path), 0, text, None if text is not None else "invalid_utf8", repaired)


def _read_jsonl(path: Path, field: str, invalid_utf8: str) -> Iterator[RawDoc]:
    empty = True
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            empty = False
            line, repaired = _decode(raw, invalid_utf8)
            if line is None:
                yield RawDoc(str(path), number, None, "invalid_utf8")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield RawDoc(str(path), number, None, "malformed_json")
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield RawDoc(str(path), number, None, "missing_field")
                continue
            yield RawDoc(str(path), number, text, None, repaired)
    if empty:
        yield RawDoc(str(path), 0, None, "empty_file")


def _read_parquet(path: Path, field: str) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        yield RawDoc(str(path), 0, None, "missing_field")
        return
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield RawDoc(str(path), row, value)
            else:
                yield RawDoc(str(path), row, None, "missing_field")
    if row == 0:
        yield RawDoc(str(path), 0, None, "empty_file")


def read_documents(
    files: Sequence[Path], *, text_field: str, invalid_utf8: str
) -> Iterator[RawDoc]:
    """Every document of every file, in order."""
    for path in files:
        kind = _kind(path)
        if kind == "text":
            yield from _read_text_file(path, invalid_utf8)
        elif kind == "jsonl":
            yield from _read_jsonl(path, text_field, invalid_utf8)
        else:
            yield from _read_parquet(path, text_field)
