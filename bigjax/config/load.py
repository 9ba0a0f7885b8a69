"""A config file plus command-line overrides, as one strict `TrainConfig`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bigjax.config.convert import MICRO_BATCH, from_configdict, load_python_function
from bigjax.config.schema import ConfigError, TrainConfig


def load_config(spec: str, overrides: Sequence[str]) -> TrainConfig:
    """Loads `path.py[:arg]`, applies `--config.a.b=value` overrides, converts strictly.

    A config file is Python by design (like big_vision): it is run, so only load your own.
    """
    path, _, arg = spec.partition(":")
    get_config = load_python_function(
        path, "get_config", "--config", "Configs live in configs/*.py."
    )
    cd = get_config(arg or None)
    if not (hasattr(cd, "to_dict") or isinstance(cd, Mapping)):
        raise ConfigError(f"--config: get_config() in {path} returned {type(cd).__name__}; "
                          "return an ml_collections.ConfigDict or a dict.")  # fmt: skip
    raw = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    for item in overrides:
        key, value = parse_override(item)
        set_path(raw, key, value)
        if isinstance(raw.get("platforms"), dict):  # what the user sets wins on every platform
            raw["platforms"] = {
                k: without(e, key) if isinstance(e, dict) else e
                for k, e in raw["platforms"].items()
            }
    return from_configdict(raw)


def parse_override(item: str) -> tuple[str, str]:
    """'--config.optim.lr=1e-3' -> ('optim.lr', '1e-3')."""
    if not item.startswith("--config.") or "=" not in item:
        raise ConfigError(
            f"unrecognised argument {item!r}: overrides look like --config.optim.lr=1e-3."
        )
    key, value = item[len("--config.") :].split("=", 1)
    return key, value


def set_path(tree: dict[str, Any], dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, name in enumerate(parents):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"--config.{dotted}: {where} is a value, not a group of keys.")
        node = child
    node[leaf] = value


def without(entry: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """`entry` less the key `a.b.c` (a command-line override wins over every entry)."""
    head, _, rest = dotted.partition(".")
    out = dict(entry)
    if head in out and not rest:
        del out[head]
    elif head in out and isinstance(out[head], Mapping):
        out[head] = without(out[head], rest)
    if dotted == "optim.grad_accum_steps":
        out.pop(MICRO_BATCH, None)
    return out
