"""Multiple-choice scoring by log-likelihood: for each item, the model's log p(choice | context)
summed over the choice's tokens; the prediction is the most likely choice, raw and per token
(length-normalised, as in the usual LM evaluation harnesses).

Items are JSON lines: {"context": str, "choices": [str, ...], "answer": int}. Every
(context, choice) pair is one row of a right-padded batch; the loss weights select the
choice's tokens, so one forward pass scores all choices of many items.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax import lora, progress
from bigjax.config import ConfigError
from bigjax.data.sources import lone_surrogate
from bigjax.data.tokenizer import Tokenizer
from bigjax.models import decoder
from bigjax.tree import Params


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int


def load_items(path: str | Path) -> list[Item]:
    """Reads a JSONL file of items. Raises ConfigError naming the line and the problem."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"multiple choice: no such file {str(path)!r} (JSON lines).")
    items = []
    # Split as bytes (see data/examples.py); a UTF-8 byte-order mark is not data.
    lines = file.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = _item(json.loads(line.decode("utf-8")))
        except (KeyError, TypeError, ValueError) as e:  # not UTF-8, not JSON: ValueErrors
            raise ConfigError(
                f"multiple choice: {path} line {n} is not an item "
                '{"context": str, "choices": [str, ...], "answer": int}: ' + f"{e!r}"[:200]
            ) from None
        if len(item.choices) < 2 or not 0 <= item.answer < len(item.choices):
            raise ConfigError(
                f"multiple choice: {path} line {n}: need >= 2 choices and 0 <= answer < "
                f"{len(item.choices)}, got {len(item.choices)} choices and answer {item.answer}."
            )
        for text in (item.context, *item.choices):
            if (at := lone_surrogate(text)) is not None:
                raise ConfigError(
                    f"multiple choice: {path} line {n}: {text[:40]!r} holds a lone surrogate "
                    f"escape at character {at} (half of a UTF-16 pair: no text); fix the line."
                )
        if "" in item.choices:  # no tokens, log-likelihood 0: it would win every time
            raise ConfigError(
                f"multiple choice: {path} line {n}: choice {item.choices.index('')} is empty; "
                "every choice needs text to be scored."
            )
        items.append(item)
    if not items:
        raise ConfigError(f"multiple choice: {path} holds no items.")
    return items


def _item(raw: object) -> Item:
    """A parsed line as an Item, its types as written: a number is not coerced into a string
    nor a string split into choices (a wrong file would score silently)."""
    if not isinstance(raw, dict):
        raise TypeError(f"a JSON {type(raw).__name__}, not an object")
    context, options, answer = raw["context"], raw["choices"], raw["answer"]
    if not isinstance(context, str):
        raise TypeError(f"context is {context!r}, not a string")
    if not isinstance(options, list) or not all(isinstance(c, str) for c in options):
        raise TypeError(f"choices is {options!r}, not a list of strings")
    if isinstance(answer, bool) or not isinstance(answer, int):  # JSON true is no index
        raise TypeError(f"answer is {answer!r}, not an integer index into choices")
    return Item(context, tuple(options), answer)


def stdlib_next_line(eval_fraction: float, num_items: int, seed: int = 0) -> list[Item]:
    """A built-in task on the held-out standard-library files (never trained on): given up to
    300 characters of a file, pick its true next line among 4 (3 lines drawn from other
    held-out files). Lines are non-trivial (>= 20 characters stripped). Chance is 25 %."""
    from bigjax.data import corpus

    _, held_out = corpus.split_stdlib(eval_fraction, chunk_bytes=1 << 30)  # whole files
    files = sorted({d.path for d in held_out})
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    lines = [[ln for ln in t.splitlines(keepends=True) if len(ln.strip()) >= 20] for t in texts]
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    for _ in range(num_items * 20):  # bounded: corpora with too few lines give fewer items
        if len(items) == num_items:
            break
        f = int(rng.integers(len(files)))
        if len(lines[f]) < 4:
            continue
        line = lines[f][int(rng.integers(1, len(lines[f])))]
        where = texts[f].find(line)
        context = texts[f][max(0, where - 300) : where]
        others = [g for g in range(len(files)) if g != f and lines[g]]
        if len(context) < 20 or len(others) < 3:
            continue
        wrong = [lines[g][int(rng.integers(len(lines[g])))] for g in rng.choice(others, 3)]
        answer = int(rng.integers(4))
        choices = wrong[:answer] + [line] + wrong[answer:]
        if len(set(choices)) == 4:
            items.append(Item(context, tuple(choices), answer))
    return items


def items_for(choices: str, eval_fraction: float, num_items: int) -> list[Item]:
    """`eval.choices`: 'stdlib' (the built-in task) or a JSON-lines file."""
    if choices != "stdlib":
        return load_items(choices)
    return stdlib_next_line(eval_fraction, num_items)


def choice_batch(
    tokenizer: Tokenizer, items: Sequence[Item], seq_len: int, min_rows: int = 0
) -> dict[str, np.ndarray]:
    """Rows of context + choice tokens, right-padded to `seq_len` (long contexts are cut from
    the left), with weights on the choice's tokens; padded with empty rows up to `min_rows`.
    Fixed shapes: the scorer compiles once and is reused at every eval."""
    rows = []
    for item in items:
        ctx = tokenizer.encode(item.context).tolist()
        for choice in item.choices:
            ans = tokenizer.encode(choice).tolist()
            if not ans:
                raise ConfigError(f"multiple choice: choice {choice!r} encodes to no tokens.")
            seq = (ctx + ans)[-(seq_len + 1) :]
            rows.append((seq, min(len(ans), len(seq) - 1)))
    num_rows = max(min_rows, len(rows))
    out = {k: np.zeros((num_rows, seq_len), np.int32) for k in ("inputs", "targets", "seg")}
    weights = np.zeros((num_rows, seq_len), np.float32)
    for i, (seq, n_ans) in enumerate(rows):
        n = len(seq) - 1
        out["inputs"][i, :n], out["targets"][i, :n] = seq[:-1], seq[1:]
        out["seg"][i, :n] = 1
        weights[i, n - n_ans : n] = 1.0
    positions = np.maximum(np.cumsum(out["seg"], axis=1) - 1, 0).astype(np.int32)
    return {**out, "positions": positions, "weights": weights}


Scorer = Callable[[Params, dict[str, np.ndarray]], tuple[jax.Array, jax.Array]]


def make_scorer(graphdef: nnx.GraphDef, lora_scale: float = 0.0) -> Scorer:
    """Jitted `score(params, batch) -> (sum of choice log-probs [R], choice tokens [R])`."""

    def score(params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        model = decoder(nnx.merge(graphdef, lora.merged(params, lora_scale)))
        logits = model(batch["inputs"], batch["seg"], batch["positions"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(target_logp * batch["weights"], axis=1), jnp.sum(batch["weights"], axis=1)

    return jax.jit(score)


def accuracy(items: Sequence[Item], logp: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Accuracy from per-choice scores, in item order (ties go to the first choice)."""
    hits = hits_norm = 0
    start = 0
    for item in items:
        k = len(item.choices)
        lp, nt = logp[start : start + k], tokens[start : start + k]
        hits += int(np.argmax(lp)) == item.answer
        hits_norm += int(np.argmax(lp / np.maximum(nt, 1))) == item.answer
        start += k
    return {"mc_accuracy": hits / len(items), "mc_accuracy_norm": hits_norm / len(items)}


def score_items(
    scorer: Scorer, params: Params, tokenizer: Tokenizer, items: Sequence[Item], seq_len: int,
    rows_per_batch: int = 64, bar: progress.Bar | None = None,
    between: Callable[[], None] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Accuracy (raw and length-normalised) of the model on `items`; `scorer` from
    `make_scorer`, made once and reused (every batch has the same shape). `bar` (a
    progress.Bar) counts the items scored; `between` runs before each batch (it may raise,
    to stop)."""
    logps, counts = [], []
    rows_per_batch = max(rows_per_batch, max(len(i.choices) for i in items))
    start = 0
    while start < len(items):
        chunk, rows = [], 0
        while start < len(items) and rows + len(items[start].choices) <= rows_per_batch:
            chunk.append(items[start])
            rows += len(items[start].choices)
            start += 1
        if between is not None:
            between()
        batch = choice_batch(tokenizer, chunk, seq_len, min_rows=rows_per_batch)
        lp, n = jax.device_get(scorer(params, batch))
        logps.append(lp[:rows])
        counts.append(n[:rows])
        if bar is not None:
            bar.advance(len(chunk))
    return accuracy(items, np.concatenate(logps), np.concatenate(counts))


def classification_metrics(confusion_CC: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 from a confusion matrix [true,
    predicted]. Averages run over the classes that occur (as truth or prediction); a class
    never predicted has precision 0, as scikit-learn's default (zero_division=0)."""
    c = np.asarray(confusion_CC, np.float64)
    tp, true_n, pred_n = np.diag(c), c.sum(1), c.sum(0)
    seen = (true_n + pred_n) > 0
    precision = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros_like(tp), where=true_n > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / max(c.sum(), 1.0)),
        "precision": float(precision[seen].mean()) if seen.any() else 0.0,
        "recall": float(recall[seen].mean()) if seen.any() else 0.0,
        "f1": float(f1[seen].mean()) if seen.any() else 0.0,
    }
