"""LoRA: low-rank adapters on chosen weight matrices, and which parameters train at all.

An adapted weight W [*lead, *in, *out] (lead: the stacked layers axis) gets A [*lead, in, r]
and B [*lead, r, out] (in/out flattened), and the model runs with W + (alpha / r) * A @ B.
A starts random, B at zero, so step 0 is exactly the base model. The adapters live in the
parameter tree under "lora", mirroring the paths of the weights they adapt; they are merged
into plain weights before the model runs (`merged`), so every family, generation, evaluation
and export use them without knowing. Export merges once and writes ordinary weights.

Why merge, not a low-rank side path in each projection: it touches no layer code and works for
any weight. The cost is the full weight gradient of each adapted matrix (needed for A and B's),
about a third of that layer's backward FLOPs, and a transient merged copy of the adapted
weights; memory for optimizer moments is the adapters' alone (the base is frozen).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bigjax.config import ConfigError, FinetuneConfig
from bigjax.tree import Params, flatten, unflatten

# Leading input axes of each weight family (the rest are outputs); biases and norms are never
# adapted. Expert weights of MoE layers are not adapted either (their leading axis is E).
N_IN = {
    "q_DHK": 1,
    "kv_DGCK": 1,
    "o_HKD": 2,
    "gate_up_DFC": 1,
    "down_FD": 1,
    "up_DF": 1,
    "lm_head_DV": 1,
}


def _lead(path: str) -> int:
    return 1 if path.startswith("blocks/") else 0  # stacked layers


def targets(layout: Mapping[str, list[int]], pattern: str) -> dict[str, tuple[int, int, int]]:
    """Adapted weight path -> (lead, in, out) sizes, for every matrix matching `pattern`."""
    out = {}
    for path, shape in layout.items():
        name = path.rsplit("/", 1)[-1]
        if name in N_IN and re.fullmatch(pattern, path):
            lead, n_in = _lead(path), N_IN[name]
            dims = shape[lead:]
            out[path] = (lead, math.prod(dims[:n_in]), math.prod(dims[n_in:]))
    if not out:
        raise ConfigError(
            f"finetune.lora_targets={pattern!r} matches no adaptable weight; candidates: "
            f"{sorted(p for p in layout if p.rsplit('/', 1)[-1] in N_IN)[:8]}"
        )
    return out


def init(
    layout: Mapping[str, list[int]], cfg: FinetuneConfig, key: jax.Array, dtype: jnp.dtype
) -> Params:
    """Fresh adapters: A ~ N(0, 1/in) (unit-scale x @ A), B = 0."""
    out = {}
    for i, (path, (lead, n_in, n_out)) in enumerate(targets(layout, cfg.lora_targets).items()):
        lead_shape = tuple(layout[path][:lead])
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead_shape, n_in, cfg.lora_rank))
        out[path] = {
            "a": (a / math.sqrt(n_in)).astype(dtype),
            "b": jnp.zeros((*lead_shape, cfg.lora_rank, n_out), dtype),
        }
    return unflatten(out)


def specs(adapters: Params, base_specs: Params) -> Params:
    """PartitionSpecs of adapters: A's input dim and B's output dim follow the first input /
    output axis of the weight they adapt (the rank dim is small and replicated)."""
    flat_base = flatten(base_specs)
    out = {}
    for path in _pairs(adapters):
        spec, lead, n_in = tuple(flat_base[path]), _lead(path), N_IN[path.rsplit("/", 1)[-1]]
        out[path] = {
            "a": PartitionSpec(*spec[:lead], spec[lead], None),
            "b": PartitionSpec(*spec[:lead], None, spec[lead + n_in]),
        }
    return unflatten(out)


def merged(params: Params, scale: float) -> Params:
    """The parameters with adapters folded in: W + scale * A @ B (no "lora" key left)."""
    if "lora" not in params:
        return params
    flat = flatten({k: v for k, v in params.items() if k != "lora"})
    for path, ab in _pairs(params["lora"]).items():
        w = flat[path]
        delta = jnp.einsum("...ir,...ro->...io", ab["a"], ab["b"]) * scale
        flat[path] = w + delta.reshape(w.shape).astype(w.dtype)
    return unflatten(flat)


def _pairs(adapters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Adapted weight path -> {"a": A, "b": B}."""
    flat = flatten(adapters)
    weights = {p.rsplit("/", 1)[0] for p in flat}
    return {w: {"a": flat[f"{w}/a"], "b": flat[f"{w}/b"]} for w in weights}


def count_trainable(params: Params, trainable: Callable[[str], bool] | None) -> int:
    """How many of the (abstract or real) parameters train under `trainable`."""
    flat = flatten(params)
    return sum(math.prod(x.shape) for k, x in flat.items() if trainable is None or trainable(k))


def trainable_fn(cfg: FinetuneConfig) -> Callable[[str], bool] | None:
    """path -> whether it trains: with LoRA only the adapters; otherwise all but what
    `freeze` matches. None when everything trains (the optimizer is then left as it is)."""
    if cfg.lora_rank:
        return lambda path: path.startswith("lora/")
    if cfg.freeze:
        return lambda path: not re.fullmatch(cfg.freeze, path)
    return None
