"""Labelled examples for fine-tuning, from a JSON-lines file (`data.examples`).

  sft:      {"prompt": str, "response": str}  -> BOS prompt response EOS, loss on response + EOS
  classify: {"text": str, "label": str | int} -> BOS text EOS and the class index

Each example is one row (`data.packing=pad`, or packed with its loss mask kept). A record goes
to the validation split by a hash of its line, so the split does not depend on file order.
Classes are the sorted distinct labels of the whole file (train and validation alike), so
both splits and every run on the file number them the same.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from bigjax.data.sources import DataError, lone_surrogate

# The record formats a task can read (its `examples` in bigjax/tasks.py): their fields.
FIELDS = {"prompt_response": ("prompt", "response"), "text_label": ("text", "label")}


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split's records and the file's class names (classify only)."""

    records: tuple[dict[str, Any], ...]
    classes: tuple[str, ...]
    digest: str = ""  # of the whole file (both splits): a resume checks it did not change


def load(path: str | Path, form: str, split: str, eval_fraction: float) -> Examples:
    """The records of `split` ('train' or 'validation') of a file in record format `form`
    (FIELDS); bad lines raise DataError naming the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.examples: no such file {str(path)!r} (JSON lines, one per example).")
    fields = FIELDS[form]
    records, labels = [], set()
    # Split as bytes: a JSON string may hold U+2028 or U+0085 unescaped, where text's
    # splitlines would cut the record in two.
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a BOM: not data
    lines = data.splitlines()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{number}: not UTF-8 (byte {e.start}); save it as UTF-8."
            ) from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON ({e}).") from None
        if not isinstance(record, dict) or any(f not in record for f in fields):
            raise DataError(f"{path}:{number}: an example needs the fields {fields}.")
        if not all(isinstance(record[f], str) for f in fields if f != "label"):
            raise DataError(f"{path}:{number}: {fields} other than label must be strings.")
        for f in fields:
            if isinstance(record[f], str) and (at := lone_surrogate(record[f])) is not None:
                raise DataError(
                    f"{path}:{number}: {f} holds a lone surrogate escape at character {at} "
                    "(half of a UTF-16 pair, such as \\ud800: no text); fix the line."
                )
        label = record.get("label", "")
        if isinstance(label, bool) or not isinstance(label, (str, int)):  # not a class name
            raise DataError(f"{path}:{number}: label is {label!r}; use a string or an integer.")
        labels.add(str(label))
        digest = hashlib.sha256(line.encode()).digest()
        held_out = int.from_bytes(digest[:8], "little") / 2**64 < eval_fraction
        if held_out == (split == "validation"):
            records.append(record)
    if not records:
        raise DataError(
            f"{path}: the {split} split is empty; add examples or change data.eval_fraction."
        )
    classes = tuple(sorted(labels, key=_label_order)) if "label" in fields else ()
    return Examples(tuple(records), classes, hashlib.sha256(data).hexdigest()[:16])


def _label_order(label: str) -> tuple:
    """Integer labels in numeric order (2 before 10), others alphabetically after them."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


@dataclasses.dataclass(frozen=True)
class Encode:
    """A record -> token ids (BOS ... EOS), the loss mask, and the class index (classify)."""

    tokenizer: Any
    classes: tuple[str, ...]  # () for prompt/response pairs

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        if not self.classes:  # a prompt/response pair (a labelled file has its classes)
            prompt = [tok.bos_id, *tok.encode(record["prompt"]).tolist()]
            response = [*tok.encode(record["response"]).tolist(), tok.eos_id]
            mask = [0] * len(prompt) + [1] * len(response)
            return {
                "tokens": np.asarray(prompt + response, np.int32),
                "loss_mask": np.asarray(mask, np.int32),
            }
        text = [tok.bos_id, *tok.encode(record["text"]).tolist(), tok.eos_id]
        return {
            "tokens": np.asarray(text, np.int32),
            "label": np.asarray(self.classes.index(str(record["label"])), np.int32),
        }
