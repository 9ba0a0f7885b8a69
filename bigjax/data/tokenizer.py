"""Tokenizers. The byte-level one needs no training and no files."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; then BOS, EOS, PAD. Any byte string round-trips, so
    files that are not valid UTF-8 need no special case."""

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, data: bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        parts = ([np.array([self.bos_id], np.int32)] if bos else []) + [ids]
        parts += [np.array([self.eos_id], np.int32)] if eos else []
        return np.concatenate(parts)

    def decode(self, ids: np.ndarray) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}
