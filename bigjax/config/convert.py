"""The one strict conversion of a ConfigDict (or plain mapping) into a `TrainConfig`, and back."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import traceback
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bigjax.config.presets import FAMILY_DEFAULTS, MODEL_SIZES
from bigjax.config.rules import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES, full_mesh_shape
from bigjax.config.schema import ConfigError, TrainConfig, unknown_choice
from bigjax.config.validate import validate


def load_python_function(path: str | Path, function: str, what: str, hint: str) -> Callable:
    """Runs a Python file (a config or a sweep spec: Python by design, like big_vision's
    configs, so only load your own) and returns its top-level `function`."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what}: no such file {str(path)!r}. {hint}")
    module_spec = importlib.util.spec_from_file_location(f"bigjax_{what}_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:  # not loadable as Python source
        raise ConfigError(f"{what}: {path} is not a Python file. {hint}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:  # no line for a file Python cannot read at all (UTF-16: NULs)
        line = f", line {e.lineno}" if e.lineno else ""
        raise ConfigError(f"{what}: {path}{line}: {e.msg}. Fix the file.") from None
    except (Exception, SystemExit) as e:  # SystemExit: a sys.exit() in the file ended bigjax
        raise _user_error(what, file, f"running {path}", e) from e
    found = getattr(module, function, None)
    if not callable(found):
        raise ConfigError(f"{what}: {path} defines no {function}() function.")

    @functools.wraps(found)
    def call(*args: Any) -> Any:
        try:
            return found(*args)
        except ConfigError:
            raise
        except (Exception, SystemExit) as e:  # the user's own code: one line, where and what
            shown = ", ".join(repr(a) for a in args)
            raise _user_error(what, file, f"{function}({shown}) in {path}", e) from e

    return call


def _user_error(what: str, file: Path, doing: str, e: BaseException) -> ConfigError:
    """An error raised by a config or spec file's own code, as one line: the file's line that
    raised it (the innermost frame in that file) and the message."""
    frames = traceback.extract_tb(e.__traceback__)
    lines = [f.lineno for f in frames if Path(f.filename).resolve() == file.resolve()]
    where = f" (line {lines[-1]})" if lines else ""
    return ConfigError(f"{what}: {doing} raised {type(e).__name__}{where}: {e}")


def from_configdict(cd: Any) -> TrainConfig:
    """Converts a ConfigDict (or nested mapping) into a validated `TrainConfig`.

    Raises:
      ConfigError: on an unknown key, a value of the wrong type or an inconsistent config.
    """
    raw = _to_plain(cd)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"get_config() must return a ConfigDict, got {type(cd).__name__}.")
    raw = dict(raw)
    if isinstance(raw.get("model"), Mapping):
        raw["model"] = _apply_presets(dict(raw["model"]))
    if isinstance(raw.get("mesh"), Mapping) and "rules" in raw["mesh"]:
        raw["mesh"] = {**raw["mesh"], "rules": _merge_rules(raw["mesh"]["rules"])}
    if isinstance(raw.get("platforms"), str) and raw["platforms"]:
        raw["platforms"] = _platforms_table(raw["platforms"])
    if isinstance(raw.get("platforms"), Mapping):
        raw["platforms"] = _platforms_json(raw)
    cfg = _build(TrainConfig, raw, "")
    mesh = dataclasses.replace(
        cfg.mesh,
        shape=full_mesh_shape(cfg.mesh.shape),
        dcn_shape=full_mesh_shape(cfg.mesh.dcn_shape),
    )
    cfg = dataclasses.replace(cfg, mesh=mesh)
    validate(cfg)
    return cfg


MICRO_BATCH = "micro_batch_per_device"  # the one non-config key a platforms entry may hold


def merge_groups(base: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """`entry`'s values over `base`'s, group by group."""
    out = dict(base)
    for key, value in entry.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_groups(out[key], value)
        else:
            out[key] = value
    return out


def _platforms_json(raw: dict[str, Any]) -> str:
    """The `platforms` table as JSON, after checking that every entry gives a valid config
    (a typo fails at load time on every machine, not only on the one it is for)."""
    table = _to_plain(raw["platforms"])
    for key, entry in table.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"platforms.{key}: expected a group of config keys, got {entry!r}.")
        micro = entry.get(MICRO_BATCH, 1)
        if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
            raise ConfigError(
                f"platforms.{key}.{MICRO_BATCH}: expected a positive int, got {micro!r}."
            )
        body = {k: v for k, v in entry.items() if k != MICRO_BATCH}
        try:
            from_configdict(merge_groups({**raw, "platforms": ""}, body))
        except ConfigError as e:
            raise ConfigError(f"platforms.{key}: {e}") from None
    return json.dumps(table, sort_keys=True)


_TABLE_EXAMPLE = '{"gpu": {"model": {"remat": "none"}}}'


def _platforms_table(text: str) -> dict[str, Any]:
    """The `platforms` table from its JSON text (a run's config.json, or the command line:
    `--config.platforms='{"gpu": {"model": {"remat": "none"}}}'`); `tune` reads it as JSON
    once the devices are known, so anything else failed there, after the config was taken."""
    try:
        table = json.loads(text)
    except ValueError as e:
        table, why = None, f" ({e})"
    else:
        why = ""
    if not isinstance(table, dict):
        raise ConfigError(
            f"platforms: expected a table of entries as JSON, e.g. {_TABLE_EXAMPLE!r}, or '' "
            f"for none; got {text!r}{why}. One value: --config.platforms.KEY.GROUP.FIELD=VALUE."
        )
    return table


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as JSON-ready nested dicts (rules become a mapping)."""
    out = dataclasses.asdict(cfg)
    if "mesh" in out:
        out["mesh"]["rules"] = {name: list(axes) for name, axes in cfg.mesh.rules}
    if "data" in out:
        out["data"]["mixture"] = dict(cfg.data.mixture)
    return out


def _to_plain(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    return x


def _apply_presets(model: dict[str, Any]) -> dict[str, Any]:
    family, size = model.get("family", "llama"), model.get("size", "")
    if family not in FAMILY_DEFAULTS:
        raise ConfigError(unknown_choice("model.family", family, FAMILY_DEFAULTS))
    if size and size not in MODEL_SIZES:
        raise ConfigError(unknown_choice("model.size", size, MODEL_SIZES))
    return {**FAMILY_DEFAULTS[family], **MODEL_SIZES.get(size, {}), **model}


def _merge_rules(user: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Overlays user rules (a mapping or pairs) on `DEFAULT_RULES`."""
    if isinstance(user, str):
        user = _parse_rules_string(user)
    pairs = _pairs(user, "mesh.rules", "{'embed': 'fsdp', ...} or 'embed=fsdp,mlp=tensor'")
    rules = dict(DEFAULT_RULES)
    for name, axes in pairs:
        if name not in LOGICAL_AXES:
            raise ConfigError(unknown_choice("mesh.rules", name, LOGICAL_AXES))
        if axes is None or axes == "" or axes == "None":
            axes = ()
        elif isinstance(axes, str):
            axes = tuple(a for a in axes.replace("+", ",").split(",") if a)
        axes = tuple(axes)
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules.{name}: unknown mesh axis {axis!r}; use any of {MESH_AXES}."
                )
        rules[name] = axes
    return tuple(rules.items())


def _parse_mixture(value: Any) -> tuple[tuple[str, float], ...]:
    """{'dirA': 0.7, 'dirB': 0.3}, [('dirA', 0.7), ...] or 'dirA:0.7,dirB:0.3'."""
    if isinstance(value, str):
        pairs = []
        for item in filter(None, (s.strip() for s in value.split(","))):
            path, sep, weight = item.rpartition(":")
            if not sep:
                raise ConfigError(f"data.mixture: expected PATH:WEIGHT, got {item!r}.")
            pairs.append((path, weight))
    else:
        pairs = _pairs(value, "data.mixture", "{'dirA': 0.7, 'dirB': 0.3} or 'dirA:0.7,dirB:0.3'")
    out: list[tuple[str, float]] = []
    seen: dict[str, str] = {}
    for path, weight in pairs:
        w = _scalar(float, weight, f"data.mixture[{path}]")
        if w <= 0:
            raise ConfigError(f"data.mixture: weight of {path!r} must be positive, got {w}.")
        # One dataset twice ('data/web' and 'data/./web/') would be read as two streams of
        # the same records: give it once, its weights summed, for the same share.
        same = os.path.normpath(os.path.abspath(str(path)))
        if same in seen:
            raise ConfigError(
                f"data.mixture: {path!r} and {seen[same]!r} are the same dataset; give it "
                f"once, with the weights summed ({seen[same]}:{dict(out)[seen[same]] + w:g})."
            )
        seen[same] = str(path)
        out.append((str(path), w))
    return tuple(out)


def _pairs(value: Any, path: str, form: str) -> list[tuple[str, Any]]:
    """A mapping, or a sequence of (name, value) pairs, as its pairs; anything else (a number,
    a list of numbers, a key that is no name) is refused naming `path` and the `form` it takes."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list | tuple) and all(
        isinstance(p, list | tuple) and len(p) == 2 for p in value
    ):
        pairs = [(p[0], p[1]) for p in value]
    else:
        raise ConfigError(f"{path}: expected {form}, got {value!r}.")
    for name, _ in pairs:
        if not isinstance(name, str):
            raise ConfigError(f"{path}: {name!r} is not a name; expected {form}.")
    return pairs


def _parse_rules_string(text: str) -> dict[str, str]:
    """'embed=fsdp,mlp=tensor' -> {'embed': 'fsdp', 'mlp': 'tensor'}; '+' joins axes."""
    return _parse_pairs(text, "mesh.rules", "name=axis[+axis]")


def _parse_pairs(text: str, path: str, form: str) -> dict[str, str]:
    """'a=x,b=y' -> {'a': 'x', 'b': 'y'}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"{path}: expected {form}, got {item!r}.")
        name, value = item.split("=", 1)
        out[name.strip()] = value.strip()
    return out


def _named_sizes(value: Any, path: str) -> Any:
    """A mesh shape by axis name ({'data': 2, 'tensor': 4}, or 'data=2,tensor=4' on the command
    line) as the tuple over every mesh axis, the unnamed ones 1; a shape by position as it is.
    Six positions are easy to misplace; names say which axis gets which size."""
    if isinstance(value, str) and "=" in value:
        value = _parse_pairs(value, path, "AXIS=SIZE")
    if not isinstance(value, Mapping):
        return value
    for axis in value:
        if axis not in MESH_AXES:
            raise ConfigError(unknown_choice(f"{path} axis", axis, MESH_AXES))
    return tuple(value.get(axis, 1) for axis in MESH_AXES)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a group of keys, got {raw!r}; set them one by one "
                          f"(--config.{prefix}KEY=VALUE).")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str):
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"config key {key!r} under {where} is not a name; keys are strings.")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(
                f"unknown config key {path!r}.{hint} Valid keys under "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}."
            )
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Checks (and, for strings from the command line, parses) one value against its type."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if path in ("mesh.shape", "mesh.dcn_shape"):
        value = _named_sizes(value, path)
    if path == "mesh.rules":
        return value if isinstance(value, tuple) else _merge_rules(value)
    if path == "data.mixture":
        return _parse_mixture(value)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        like = "sizes by position like 1,1,-1,1,1,1 or by axis like data=2,fsdp=-1"
        like = like if path in ("mesh.shape", "mesh.dcn_shape") else "a tuple like 1,8,1"
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {like}, got {value!r}.")
        (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        try:
            return tuple(_coerce(elem, v, path) for v in value)
        except ConfigError as e:  # which forms work, then what was wrong with this entry
            why = str(e).removeprefix(f"{path}: ")
            raise ConfigError(f"{path}: expected {like}, got {value!r}: {why}") from None
    if origin is typing.Literal:  # a choice field
        if value not in typing.get_args(tp):
            raise ConfigError(unknown_choice(path, value, typing.get_args(tp)))
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{path}: unsupported type {tp}.")  # not used by any field
    return _scalar(tp, value, path)


def _scalar(tp: type, value: Any, path: str) -> Any:
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        value = value.item()  # np.int64(5), np.float32(1e-3): a config computed with NumPy
    if isinstance(value, str) and tp is not str:
        value = _parse_string(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):  # no setting means inf or NaN
        raise ConfigError(f"{path}: expected a finite number, got {value!r}.")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # a 2**70 seed: OverflowError
        raise ConfigError(f"{path}: {value} does not fit a 64-bit integer.")
    return value


def _parse_string(tp: type, text: str, path: str) -> Any:
    text = text.strip()
    try:
        if tp is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int and "e" in text.lower():  # 1e6 steps; 1e-30 or 1.5e0 is no integer
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except (ValueError, OverflowError):  # OverflowError: int('1e999'), an infinity
        pass
    raise ConfigError(f"{path}: expected {tp.__name__}, got {text!r}.")
