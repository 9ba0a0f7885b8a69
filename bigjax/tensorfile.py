"""The safetensors file format, read and written with NumPy alone (no torch, no pickle).

A file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} (plus an optional "__metadata__" of strings), then the raw little-endian bytes.
bfloat16 comes from ml_dtypes (a JAX dependency), which the `safetensors` package's NumPy API
lacks. Reads are memory-mapped, so converting a large model copies only what it converts.
A directory holds one `model.safetensors`, or shards named in `model.safetensors.index.json`
(the Hugging Face layout).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from bigjax.errors import UsageError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
MAX_HEADER = 100 << 20  # the safetensors format's own bound on the JSON header (100 MB)


class TensorFileError(UsageError, ValueError):
    """A malformed or missing safetensors file; the message names the file."""


def read(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one file, as read-only arrays backed by a memory map."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:  # (and np.memmap refuses an empty file)
        raise TensorFileError(f"{path}: too short to be a safetensors file ({size} bytes)")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    if header_len > MAX_HEADER or 8 + header_len > raw.size:
        raise TensorFileError(f"{path}: header length {header_len} runs past the file's end")
    try:
        header = json.loads(raw[8 : 8 + header_len].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise TensorFileError(f"{path}: unreadable JSON header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: the header is a {type(header).__name__}, not a mapping")
    body = raw[8 + header_len :]
    out = {}
    spans = []  # (start, end, name): the data of distinct tensors may not overlap
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _well_formed(info):
            raise TensorFileError(
                f"{path}: tensor {name!r} has a malformed entry (want dtype, shape as a list "
                "of non-negative ints and two data offsets)"
            )
        if info["dtype"] not in DTYPES:
            raise TensorFileError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}"
            )
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = info["data_offsets"]
        if end - start != math.prod(shape) * dtype.itemsize or not 0 <= start <= end <= body.size:
            raise TensorFileError(
                f"{path}: tensor {name!r} {info['dtype']}{list(shape)} has data offsets "
                f"[{start}, {end}) that do not fit its size or the file"
            )
        out[name] = body[start:end].view(dtype).reshape(shape)
        spans.append((start, end, name))
    _check_layout(path, sorted(spans), body.size)
    return out


def _check_layout(path: Path, spans: list[tuple[int, int, str]], size: int) -> None:
    """As the format (and its reference reader) requires: tensors' data back to back, in
    offset order, from the first byte after the header to the file's end. Overlapping ranges
    would make one tensor's bytes another's; a gap or a tail would hide data no tensor owns."""
    end = 0
    for start, stop, name in spans:
        if start != end:
            what = (
                "overlaps the tensor before it"
                if start < end
                else f"leaves bytes [{end}, {start}) unowned"
            )
            raise TensorFileError(
                f"{path}: tensor {name!r} at data offsets [{start}, {stop}) {what}; the file is "
                "malformed (safetensors tensors are stored back to back)"
            )
        end = stop
    if end != size:
        raise TensorFileError(
            f"{path}: {size - end} bytes after the last tensor's data belong to no tensor; the "
            "file is malformed or was appended to"
        )


def _well_formed(info: object) -> bool:
    def ints(x: object, n: int | None = None) -> bool:
        if not isinstance(x, list) or (n is not None and len(x) != n):
            return False
        return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)

    return (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and ints(info.get("shape"))
        and ints(info.get("data_offsets"), 2)
    )


def write(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> int:
    """Writes one file atomically (a temporary name, then a rename); returns its data bytes."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    arrays = {}
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in NAMES:
            raise TensorFileError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}")
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays[name] = array
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for array in arrays.values():  # native order: every JAX host is little-endian
            f.write(array.tobytes())
    tmp.replace(path)
    return offset


def read_dir(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory: the shards its index names, or its single file."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        weight_map = _weight_map(directory / INDEX)
        out: dict[str, np.ndarray] = {}
        inside = directory.resolve()
        for shard in sorted(set(weight_map.values())):
            # The index is data from elsewhere: it names files of this directory, nothing else
            # (no `../`, no absolute paths, no symlinks out of it).
            if not (directory / shard).resolve().is_relative_to(inside):
                raise TensorFileError(
                    f"{directory / INDEX} names {shard!r}, which lies outside {directory}"
                )
            if not (directory / shard).is_file():
                raise TensorFileError(f"{directory / INDEX} names {shard}, which is missing")
            for name, array in read(directory / shard).items():
                # A tensor is read from the one shard the index names for it and must be in
                # no other: a second copy would make the result depend on the reading order.
                if weight_map.get(name) != shard:
                    listed = "does not list it"
                    if name in weight_map:
                        listed = f"names {weight_map[name]} for it"
                    raise TensorFileError(
                        f"{directory / shard} holds tensor {name!r}, but {INDEX} {listed}; the "
                        "directory is malformed"
                    )
                out[name] = array
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise TensorFileError(
                f"{directory}: tensors in the index but in no shard: {missing[:5]}"
            )
        return out
    if (directory / SINGLE).is_file():
        return read(directory / SINGLE)
    found = sorted(p.name for p in directory.glob("*"))[:10]
    raise TensorFileError(
        f"{directory} has neither {SINGLE} nor {INDEX} (found {found}). Save the model with "
        "safetensors (transformers' save_pretrained does by default); .bin/.pt pickles are "
        "never loaded."
    )


def _weight_map(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise TensorFileError(f"{path}: not a safetensors index ({type(e).__name__})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise TensorFileError(f"{path}: its weight_map is not a mapping of names to files")
    return weight_map


def write_dir(
    directory: str | Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int
) -> list[str]:
    """Writes `model.safetensors`, or shards of at most `max_shard_bytes` (a tensor larger than
    that gets a shard of its own) plus the index; returns the file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers' loader requires the key
    if len(shards) == 1:
        write(directory / SINGLE, shards[0], metadata)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(write(directory / n, s, metadata) for n, s in zip(names, shards, strict=True))
    index = {
        "metadata": {"total_size": total},
        "weight_map": {t: n for n, s in zip(names, shards, strict=True) for t in s},
    }
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX]
