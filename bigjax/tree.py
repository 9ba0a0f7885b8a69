"""Parameter trees as flat {"blocks/attn/q_DHK": leaf} maps and back: the names that
checkpoint layouts, Hugging Face rules, LoRA targets and freeze patterns use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# A parameter tree (nnx's pure dict: nested dicts by module path, arrays at the leaves), or a
# tree of the same structure (gradients, ShapeDtypeStructs, PartitionSpecs, shardings).
Params = dict[str, Any]


def flatten(tree: Mapping[str, object], prefix: str = "", sep: str = "/") -> Params:
    """Nested parameter dict -> {"blocks/attn/q_DHK": leaf, ...} (a config: sep=".")."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}{sep}", sep)
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: Mapping[str, object]) -> Params:
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def path_name(path: tuple) -> str:
    """A pytree key path -> "blocks/attn/q_DHK"."""
    return "/".join(str(getattr(k, "key", k)) for k in path)
