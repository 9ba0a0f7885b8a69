"""The task registry: what each `data.task` trains on, declared once.

A task declares its batch (every array's key, dtype, dims and logical sharding names), where
its rows come from, the loss that reads them and how its eval reduces. The pipeline, the
shardings, `plan`'s abstract inputs and the eval all read this declaration; nothing else
branches on the task's name. A new task is one entry here and, if its loss is new, one class
in bigjax/objectives/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from bigjax.config import TrainConfig

# The dims a field's shape is made of, resolved from the config (`shape`).
TOKEN_DIMS = ("batch", "seq")
TOKEN_AXES = ("act_batch", "act_seq")  # logical sharding names (bigjax/sharding.py rules)


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of a batch: its dtype, its dims by name and their logical sharding names."""

    dtype: str
    dims: tuple[str, ...]
    axes: tuple[str | None, ...]


TOKENS = {
    "inputs": Field("int32", TOKEN_DIMS, TOKEN_AXES),
    "targets": Field("int32", TOKEN_DIMS, TOKEN_AXES),
    "segment_ids": Field("int32", TOKEN_DIMS, TOKEN_AXES),
    "positions": Field("int32", TOKEN_DIMS, TOKEN_AXES),
    "weights": Field("float32", TOKEN_DIMS, TOKEN_AXES),
}
LABELS = {"labels": Field("int32", ("batch",), ("act_batch",))}
IMAGES = {"images": Field("float32", ("batch", "image", "image", "channels"),
                          ("act_batch", None, None, None))}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Task:
    """What one `data.task` is made of."""

    name: str
    fields: Mapping[str, Field]  # the batch the train and eval steps take
    source: str  # 'documents' (corpus / prepared datasets), 'examples' (JSONL), 'images'
    row_features: tuple[str, ...]  # what a packed row carries before it becomes the batch
    loss: str  # the loss class in bigjax/objectives (LOSSES)
    examples: str = ""  # source 'examples': the record format (bigjax/data/examples.py)
    masked: bool = False  # inputs masked afresh every step (needs a [MASK] id)
    classifies: bool = False  # eval: accuracy and macro precision/recall/F1, no perplexity

    @property
    def tokenized(self) -> bool:
        """Reads token ids (so the model's vocabulary must cover the tokenizer's)."""
        return "inputs" in self.fields

    def shapes(self, cfg: TrainConfig) -> dict[str, tuple[int, ...]]:
        """Every field's global shape under `cfg`."""
        size = {"batch": cfg.data.batch_size, "seq": cfg.data.seq_len,
                "image": cfg.model.image_size, "channels": cfg.model.channels}  # fmt: skip
        return {k: tuple(size[d] for d in f.dims) for k, f in self.fields.items()}


TASKS = {
    t.name: t
    for t in (
        Task("lm", TOKENS, "documents", ("tokens",), "next_token"),
        Task("sft", TOKENS, "examples", ("tokens", "loss_mask"), "next_token", "prompt_response"),
        Task("mlm", TOKENS, "documents", ("tokens",), "next_token", masked=True),
        Task("classify", {**TOKENS, **LABELS}, "examples", ("tokens",), "classify", "text_label",
             classifies=True),
        Task("images", {**IMAGES, **LABELS}, "images", ("image",), "images", classifies=True),
    )
}  # fmt: skip


def task_of(cfg: TrainConfig) -> Task:
    """The declaration of the config's task (validated against TASKS by the schema)."""
    return TASKS[cfg.data.task]
