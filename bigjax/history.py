"""What trained each step range of a run: the config a resume changes, and the workdir's record.

A resume compares this run's config with the one its checkpoint was saved under. Keys that
make the saved state unusable (`UNUSABLE`: another optimizer, model shape or vocabulary, task,
trainable set, DP accounting) stop the run before anything is restored; every other change
(learning rate, schedule, steps, eval, mesh, ...) is allowed, shown as a diff, and appended to
`config_history.jsonl`: one line per segment of the run, `{"from_step": N, "changed": {key:
[old, new]}}`, after a first line holding the whole config the run started with. config.json
holds the config of the latest segment (it must stay loadable as a config); the history says
which config trained which steps.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigjax import tree
from bigjax.config import full_mesh_shape
from bigjax.errors import BigjaxWarning

HISTORY = "config_history.jsonl"

# Keys whose change makes a checkpoint unusable, and the way out for each group. Model keys
# not listed (dropout, dtype, remat, attention kernel, RoPE scaling, MoE capacity, ...) change
# how the same parameters compute, not what they are.
_FRESH_OPTIMIZER = (
    "start a new --workdir with --config.checkpoint.init_from={run} "
    "--config.checkpoint.init_mode=params (its weights, a fresh optimizer)"
)
_NEW_MODEL = "set it back, or start a new --workdir: the saved weights do not fit this model"
UNUSABLE: dict[str, str] = {
    "optim.name": _FRESH_OPTIMIZER,
    **{
        f"model.{k}": _NEW_MODEL
        for k in (
            "family",
            "size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "d_ff",
            "vocab_size",
            "tie_embeddings",
            "positions",
            "max_positions",
            "norm",
            "mlp",
            "use_bias",
            "causal",
            "image_size",
            "patch_size",
            "channels",
            "num_classes",
            "num_experts",
            "experts_per_token",
            "param_dtype",
        )  # fmt: skip
    },
    "data.tokenizer": _NEW_MODEL + " (its token ids mean other text)",
    "data.task": _NEW_MODEL + " (it was trained for another task)",
    **{f"finetune.{k}": _FRESH_OPTIMIZER for k in ("freeze", "lora_rank", "lora_targets")},
    **{
        f"privacy.{k}": "start a new --workdir: epsilon is accounted over the whole run"
        for k in ("noise_multiplier", "target_epsilon", "delta", "clip_norm", "num_examples")
    },
}


def flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict (as config.json holds it) -> {"optim.lr": 0.003, ...}."""
    return tree.flatten(config, sep=".")


def as_json(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists), for comparing."""
    return json.loads(json.dumps(config))


def changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: {key: (saved, current)}. Keys only one side has
    (a config written by another bigjax version) are not compared: their value on the other
    side is unknown. A data.mixture source (a key a path) added or removed is a change."""
    a, b = (_full_mesh(flat(as_json(c))) for c in (saved, current))
    # a data.mixture source added or removed: its own key, on one side (None on the other)
    sources = {k for k in a.keys() ^ b.keys() if k.startswith("data.mixture.")}
    keys = sorted((a.keys() & b.keys()) | sources)
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def _full_mesh(flat_cfg: dict[str, Any]) -> dict[str, Any]:
    """Mesh shapes of an older layout (five or three entries) over every axis, so that the
    same mesh written before the `expert` axis is not a change."""
    for key in ("mesh.shape", "mesh.dcn_shape"):
        if isinstance(flat_cfg.get(key), list):
            flat_cfg[key] = list(full_mesh_shape(tuple(flat_cfg[key])))
    return flat_cfg


_NEW_ORDER = (
    "the training order goes on at the same position of another order, so documents read "
    "before may come again and others wait until the epoch ends"
)
# Changes that resume but alter what the steps after them read, beyond what the diff shows:
# said on the resume that makes them. Not here: data.seq_len and data.mixture's weights (the
# order goes on, bigjax/data/datastate.py and mixture.py, which says when its sources change).
CAVEATS: dict[str, str] = {
    "data.eval_fraction": (
        "where the run draws its held-out split (the built-in corpus, data.examples, "
        "data.images) it is drawn anew: documents trained on may now be evaluated, and eval "
        "losses before and after this step do not compare; " + _NEW_ORDER
    ),
    "data.shuffle": _NEW_ORDER,
}


def caveats(
    changed: Mapping[str, tuple[object, object]], config: Mapping[str, object]
) -> list[str]:
    """What the changed keys do to the data the steps after them read, one line each
    (`config`: the run's current one)."""
    lines = [f"{k} changed: {CAVEATS[k]}." for k in sorted(changed.keys() & CAVEATS.keys())]
    now = flat(as_json(config))
    was = {k: changed[k][0] if k in changed else now.get(k) for k in ("seed", "data.seed")}
    if _order_seed(was) != _order_seed(now):
        lines.append(f"the data order's seed changed ({_order_seed(was)} -> {_order_seed(now)}): "
                     f"{_NEW_ORDER}.")  # fmt: skip
    return lines


def _order_seed(flat_cfg: Mapping[str, object]) -> object:
    """The data order's seed: data.seed, or seed while data.seed is -1."""
    data_seed = flat_cfg.get("data.seed")
    return data_seed if isinstance(data_seed, int) and data_seed >= 0 else flat_cfg.get("seed")


def unusable(changed: Mapping[str, tuple[Any, Any]], run: str) -> str | None:
    """The error for changed keys the checkpoint cannot continue with, or None."""
    bad = {k: v for k, v in changed.items() if k in UNUSABLE}
    if not bad:
        return None
    lines = [f"{k}={old!r} in the checkpoint, {new!r} in this run" for k, (old, new) in bad.items()]
    fixes = dict.fromkeys(UNUSABLE[k].format(run=run) for k in bad)  # unique, in order
    return f"{'; '.join(lines)}. To go on: {'; or '.join(fixes)}."


def describe(changed: Mapping[str, tuple[Any, Any]], limit: int = 20) -> str:
    """The changes as indented `key: old -> new` lines, at most `limit` of them."""
    lines = [f"  {k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:limit]]
    if len(changed) > limit:
        lines.append(f"  ... and {len(changed) - limit} more (see config.json)")
    return "\n".join(lines)


def read(workdir: Path) -> list[dict[str, Any]]:
    """The run's segments, oldest first ([] for a run without a history). A line that is not
    a segment (edited by hand, or from another tool) is skipped with a warning: the history
    is a record, and a damaged record must not stop a run from resuming."""
    path = Path(workdir) / HISTORY
    if not path.exists():
        return []
    out, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            entry = {}
        if entry is None:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("from_step"), int):
            out.append(entry)
        else:
            bad += 1
    if bad:
        warnings.warn(
            f"{path}: {bad} line(s) that are not config segments skipped",
            category=BigjaxWarning,
            stacklevel=2,
        )
    return out


def record(
    workdir: Path, start: int, config: Mapping[str, Any], saved: Mapping[str, Any] | None
) -> dict[str, tuple[Any, Any]]:
    """Appends the segment starting at step `start` to the run's history and prints how its
    config differs from `saved` (the resumed checkpoint's; None for a fresh start); returns
    the changes. Segments that began at or after `start` trained steps no checkpoint kept:
    they are dropped. A run without a history (a fresh start, or one written before bigjax
    kept it) begins it with the whole config its first steps trained under."""
    changed = changes(saved, config) if saved is not None else {}
    entries = [e for e in read(workdir) if e["from_step"] < start]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not entries:
        first = as_json(saved if saved is not None else config)
        entries.append({"from_step": 0, "time": stamp, "config": first})
    if changed:
        entries.append(
            {"from_step": start, "time": stamp, "changed": {k: list(v) for k, v in changed.items()}}
        )
        print(f"config changed since step {start} ({HISTORY}):\n{describe(changed)}", flush=True)
        for line in caveats(changed, config):
            warnings.warn(line, BigjaxWarning, stacklevel=2)
    tmp = Path(workdir) / f"{HISTORY}.tmp"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    tmp.replace(Path(workdir) / HISTORY)  # never a half-written history
    return changed


def _change(key: str, pair: Any) -> str:
    if isinstance(pair, list) and len(pair) == 2:
        return f"{key} {pair[0]!r} -> {pair[1]!r}"
    return f"{key} changed"


def segments(workdir: Path, last_step: int) -> list[str]:
    """One line per segment: `steps A-B: changes` (the first: `steps 0-B: as started`)."""
    entries = read(workdir)
    out = []
    for i, e in enumerate(entries):
        end = entries[i + 1]["from_step"] if i + 1 < len(entries) else last_step
        changed = e.get("changed") if isinstance(e.get("changed"), dict) else None
        what = (
            ", ".join(_change(k, pair) for k, pair in changed.items()) if changed else "as started"
        )
        out.append(f"steps {e['from_step']}-{end}: {what}")
    return out
