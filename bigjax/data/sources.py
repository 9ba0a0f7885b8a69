"""Raw documents from input files: text files, JSONL (plain, gzip, zstd), Parquet, the stdlib.

Readers stream, and no record is held past `max_record_bytes` of its raw bytes: a longer JSONL
line or text file is read through in chunks and skipped as `too_large` (a 2 GiB line inflated
from a small .jsonl.gz costs no more memory than a short one). So memory stays bounded by that
cap (JSONL, text) or one batch (Parquet, whose cells pyarrow reads whole). A record that
cannot be used is yielded with a `skip` reason, so the caller counts it (or, with --strict,
stops at it) instead of losing it silently; a file that cannot be read at
all (vanished, unreadable, not a regular file) is recorded in the `FileLog` with its reason and
named on stderr, and the run goes on.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

from bigjax.data import files as filetree
from bigjax.data.corpus import stdlib_files
from bigjax.errors import UsageError, shown_path

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


@dataclasses.dataclass
class FileLog:
    """What happened to each input file: read (with size and SHA-256 of the bytes read), or
    skipped with a reason."""

    read: list[dict] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((shown_path(path), reason))
        filetree.log_skip(path, reason)


class DataError(UsageError, ValueError):
    """Input that cannot be prepared; the message names the file (and line) and the fix."""


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffixes, kind in (
        (JSONL_SUFFIXES, "jsonl"),
        (PARQUET_SUFFIXES, "parquet"),
        (TEXT_SUFFIXES, "text"),
    ):
        if name.endswith(suffixes):
            return kind
    return None


def _kind(path: Path) -> str:
    if kind := _kind_of(path):
        return kind
    raise DataError(
        f"{shown_path(path)}: unsupported file type; supported: {', '.join(SUPPORTED)}. "
        "Narrow the pattern to those, or name the folder itself: a folder's other files are "
        "skipped and counted."
    )


def expand_inputs(patterns: Sequence[str]) -> filetree.Expanded:
    """Globs (recursive `**` allowed), folders (every file under them) and 'stdlib': each real
    file once, sorted within each pattern, plus what matched but cannot be read. A pattern that
    names nothing at all, or only folders, is an error (a typo, not an odd file)."""
    explicit = {"stdlib": stdlib_files()} if "stdlib" in patterns else {}
    for pattern in patterns:
        if pattern in explicit or os.path.isdir(pattern):
            continue
        found = filetree.matches(pattern)
        if not found:
            raise DataError(f"--input {pattern!r}: no such file (nothing matches).")
        if all(os.path.isdir(p) for p in found):  # `corpora/*`: folders, not their files
            raise DataError(
                f"--input {pattern!r}: matches only folders ({shown_path(found[0])}"
                f"{f' and {len(found) - 1} more' if len(found) > 1 else ''}); name a folder to "
                f"read every file under it, or match its files ('{pattern}/**/*.jsonl')."
            )
    expanded = filetree.expand(patterns, explicit, usable=lambda path: bool(_kind_of(path)))
    if not expanded.files and not expanded.skipped:
        shown = " ".join(repr(p) for p in patterns)
        raise DataError(f"--input {shown}: no files in it (only empty folders).")
    for path in expanded.files:
        _kind(path)
    return expanded


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it (the manifest's SHA-256 is of the
    bytes actually read, even if the file changes afterwards)."""

    def __init__(self, raw: io.BufferedReader):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        n = self.raw.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        self.size += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decode(data: bytes, invalid_utf8: str) -> tuple[str | None, bool]:
    """(text, repaired); text is None when invalid bytes are to be dropped.

    A byte that is not UTF-8 is, in practice, almost always Windows-1252 or Latin-1 text pasted
    into a UTF-8 file ('Caf\\xe9'): repaired as such, not to U+FFFD, so the word survives."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        if invalid_utf8 == "drop":
            return None, False
    pieces, rest = [], data
    while True:
        try:
            pieces.append(rest.decode("utf-8"))
            return "".join(pieces), True
        except UnicodeDecodeError as e:
            pieces.append(rest[: e.start].decode("utf-8"))
            bad = rest[e.start : e.end]
            pieces.append(bad.decode("cp1252", errors="replace"))
            rest = rest[e.end :]


SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds half of a UTF-16 pair, or None. JSON's `"\\ud800"` escape parses to
    one (a pair parses to its character): no UTF-8 writer or tokenizer takes it."""
    found = SURROGATE.search(text)
    return None if found is None else found.start()


def _decompressed(raw: io.BufferedIOBase, name: str) -> io.BufferedIOBase:
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[arg-type]
        return io.BufferedReader(reader)  # zstandard's stubs take IO[bytes], not BufferedIOBase
    return raw


CHUNK = 1 << 20  # bytes read at a time while skipping through an over-long record

# Longest first: UTF-32-LE's mark starts with UTF-16-LE's.
_WIDE_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _as_utf8(f: io.BufferedIOBase) -> io.BufferedIOBase:
    """`f`, or, for a file that starts with a UTF-16 or UTF-32 byte-order mark (what Windows
    Notepad saves as "Unicode"), its text re-encoded as UTF-8 as it is read. Read as UTF-8,
    such a text file was NUL-riddled mojibake and every line of such a JSONL file malformed.
    Code units that do not decode become U+FFFD (`--invalid-utf8` is about UTF-8)."""
    head = f.peek(4)[:4]  # type: ignore[attr-defined]  # BufferedReader and GzipFile peek
    for mark, encoding in _WIDE_MARKS:
        if head.startswith(mark):
            return io.BufferedReader(_Utf8(f, encoding))
    return f


class _Utf8(io.RawIOBase):
    """A UTF-16 or UTF-32 byte stream as UTF-8 bytes, a chunk of text at a time."""

    def __init__(self, f: io.BufferedIOBase, encoding: str):
        # newline="": lines are split later, on the UTF-8 bytes, as for every other file
        self._text = io.TextIOWrapper(f, encoding=encoding, errors="replace", newline="")  # type: ignore[type-var]
        self._pending, self._at = b"", 0  # UTF-8 of the last chunk read, and how far given

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        while self._at == len(self._pending):
            chunk = self._text.read(CHUNK // 4)
            if not chunk:
                return 0
            self._pending, self._at = chunk.encode("utf-8"), 0
        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._pending) - self._at)
        out[:n] = self._pending[self._at : self._at + n]  # an offset: no copy of the rest
        self._at += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._text.detach()  # the caller closes the file it opened
        super().close()


def _read_through(f: io.BufferedIOBase, line: bool) -> None:
    """Reads (and drops) the rest of the current line, or of the file, a chunk at a time: the
    bytes still pass through the input's SHA-256, and memory stays at one chunk."""
    while chunk := (f.readline(CHUNK) if line else f.read(CHUNK)):
        if line and chunk.endswith(b"\n"):
            return


def _lines(f: io.BufferedIOBase, limit: int) -> Iterator[bytes | None]:
    """The lines of `f` (with their newline), None in place of each line longer than `limit`
    bytes, which is never held whole."""
    while raw := f.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
        else:
            _read_through(f, line=True)
            yield None


def _read_text_file(
    source: str, f: io.BufferedIOBase, invalid_utf8: str, limit: int
) -> Iterator[RawDoc]:
    data = f.read(limit + 1)
    if len(data) > limit:
        _read_through(f, line=False)
        yield RawDoc(source, 0, None, "too_large")
        return
    data = data.removeprefix(codecs.BOM_UTF8)  # a byte-order mark (Windows tools): not text
    if not data.strip():
        yield RawDoc(source, 0, None, "empty_file")
        return
    text, repaired = _decode(data, invalid_utf8)
    yield RawDoc(source, 0, text, None if text is not None else "invalid_utf8", repaired)


def _read_jsonl(
    source: str, f: io.BufferedIOBase, field: str, invalid_utf8: str, limit: int
) -> Iterator[RawDoc]:
    empty = True
    for number, raw in enumerate(_lines(f, limit), start=1):
        if raw is None:
            empty = False
            yield RawDoc(source, number, None, "too_large")
            continue
        if number == 1:  # a byte-order mark: the first record was dropped as malformed
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        empty = False
        line, repaired = _decode(raw, invalid_utf8)
        if line is None:
            yield RawDoc(source, number, None, "invalid_utf8")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            yield RawDoc(source, number, None, "malformed_json")
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield RawDoc(source, number, None, "missing_field")
            continue
        if lone_surrogate(text) is not None:  # JSON's "\ud800": valid JSON, not Unicode
            if invalid_utf8 == "drop":
                yield RawDoc(source, number, None, "invalid_utf8")
                continue
            text, repaired = SURROGATE.sub("\ufffd", text), True
        yield RawDoc(source, number, text, None, repaired)
    if empty:
        yield RawDoc(source, 0, None, "empty_file")


def _read_parquet(
    source: str,
    f: io.BufferedIOBase,
    raw: io.BufferedReader,
    field: str,
    invalid_utf8: str,
    limit: int,
) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    # Parquet is read by seeking: hash it whole through `f` first, then let pyarrow read the
    # same open file (`raw`) again from the start.
    while f.read(1 << 20):
        pass
    raw.seek(0)
    pf = pq.ParquetFile(raw)
    if field not in pf.schema_arrow.names:
        yield RawDoc(source, 0, None, "missing_field")
        return
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str | bytes) and _over(value, limit):
                yield RawDoc(source, row, None, "too_large")
            elif isinstance(value, str):
                yield RawDoc(source, row, value)
            elif isinstance(value, bytes):  # BINARY without its UTF-8 mark (Hive, older Spark)
                text, repaired = _decode(value, invalid_utf8)
                skip = None if text is not None else "invalid_utf8"
                yield RawDoc(source, row, text, skip, repaired)
            else:
                yield RawDoc(source, row, None, "missing_field")
    if row == 0:
        yield RawDoc(source, 0, None, "empty_file")


def _over(value: str | bytes, limit: int) -> bool:
    """Whether `value` is over `limit` bytes of UTF-8; a string is encoded only when it might
    be (a character is at most 4 bytes)."""
    if isinstance(value, bytes):
        return len(value) > limit
    return len(value) * 4 > limit and len(value.encode()) > limit


def _failure(error: Exception) -> str | None:
    """'corrupt' for damaged compressed or Parquet data, 'unreadable' for I/O errors."""
    corrupt: tuple[type, ...] = (EOFError, gzip.BadGzipFile)
    try:
        import pyarrow
        import zstandard

        corrupt += (zstandard.ZstdError, pyarrow.ArrowException)
    except ImportError:
        pass
    if isinstance(error, corrupt):
        return "corrupt"
    return "unreadable" if isinstance(error, OSError) else None


def read_documents(
    files: Sequence[Path],
    *,
    text_field: str,
    invalid_utf8: str,
    log: FileLog,
    max_record_bytes: int = 32 << 20,
) -> Iterator[RawDoc]:
    """Every document of every file, in order; files that cannot be read go to `log`, records
    over `max_record_bytes` are skipped as `too_large` without being held."""
    limit = max_record_bytes
    for path in files:
        kind = _kind(path)
        try:
            raw = filetree.open_regular(path)
        except filetree.Skip as e:
            log.skip(path, e.reason)
            continue
        hashing = _Hashing(raw)
        source = shown_path(path)
        try:
            with io.BufferedReader(hashing) as f:
                if kind == "text":
                    yield from _read_text_file(source, _as_utf8(f), invalid_utf8, limit)
                elif kind == "jsonl":
                    with _decompressed(f, path.name.lower()) as stream:
                        yield from _read_jsonl(
                            source, _as_utf8(stream), text_field, invalid_utf8, limit
                        )
                else:
                    yield from _read_parquet(source, f, raw, text_field, invalid_utf8, limit)
        except Exception as e:  # noqa: BLE001 - sorted into corrupt / unreadable, or re-raised
            # Documents read before the error are kept (and were counted); the file is named.
            reason = _failure(e)
            if reason is None:
                raise
            log.skip(path, reason)
            continue
        log.read.append(
            {"path": source, "bytes": hashing.size, "sha256": hashing.digest.hexdigest()}
        )
