"""Sweep and ablation specs: plain frozen dataclasses a Python file returns from `get_sweep()`.

A spec names a base config, fixed overrides, a search space over config keys, seeds, the
objective and a budget. `points()` expands it into the trials to run, as config overrides.
Grid and random points are drawn here, up front and seeded, so every worker on every machine
agrees on them; only TPE chooses its points while the sweep runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from bigjax.config import ConfigError, load_python_function

if TYPE_CHECKING:  # optuna is imported where a sweep runs
    import optuna

Value = bool | int | float | str


@dataclasses.dataclass(frozen=True)
class Grid:
    """Every value is tried (grid search); a random or TPE sweep picks among them."""

    values: tuple[Value, ...]


@dataclasses.dataclass(frozen=True)
class Uniform:
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class LogUniform:
    """Uniform in log space: learning rates, weight decays, init scales."""

    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class IntUniform:
    low: int
    high: int  # inclusive


Param = Grid | Uniform | LogUniform | IntUniform

ALGORITHMS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving")
OBJECTIVES = ("eval_loss", "best_eval_loss")


def Choice(*values: Value) -> Grid:  # noqa: N802 (reads as a distribution, like the others)
    """One of `values`: the same as Grid (a grid sweep tries them all)."""
    return Grid(tuple(values))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A search over config keys. `variants` (named groups of overrides, e.g. an ablation's
    baseline and its changes) become one more axis, the `variant` parameter."""

    name: str
    config: str  # configs/NAME.py[:ARG], relative to the working directory
    space: Mapping[str, Param] = dataclasses.field(default_factory=dict)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every trial
    variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    baseline: str = ""  # the variant the report compares the others with
    algorithm: str = "grid"
    seeds: tuple[int, ...] = (0,)
    budget: int = 0  # random / tpe: number of parameter points (each run once per seed)
    objective: str = "eval_loss"  # final eval loss, or the best one seen during the run
    direction: Literal["minimize", "maximize"] = "minimize"
    pruner: str = "none"  # stop hopeless trials on intermediate eval loss
    sampler_seed: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        _check(self.algorithm in ALGORITHMS, "algorithm", f"one of {ALGORITHMS}")
        _check(self.pruner in PRUNERS, "pruner", f"one of {PRUNERS}")
        _check(self.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}")
        _check(self.direction in ("minimize", "maximize"), "direction", "minimize or maximize")
        _check(len(self.seeds) > 0, "seeds", "at least one seed")
        _check(self.name.replace("_", "").replace("-", "").isalnum(), "name", "[A-Za-z0-9_-]")
        if self.algorithm == "grid":
            bad = [k for k, p in self.space.items() if not isinstance(p, Grid)]
            _check(not bad, "space", f"Grid/Choice values only for a grid sweep (not {bad})")
        else:
            _check(self.budget > 0, "budget", f"> 0 points for a {self.algorithm} sweep")
        _check(not self.baseline or self.baseline in self.variants, "baseline", "a variant")
        for key, field in (("variant", "variants={NAME: {KEY: VALUE}}"), ("seed", "seeds=(0, 1)")):
            if key in self.space:  # not _check: "space must be 'seed' is reserved" was said
                raise ConfigError(f"sweep spec: space holds {key!r}, but {key!r} is reserved: "
                                  f"give Sweep({field}).")  # fmt: skip
        for key, p in self.space.items():
            if isinstance(p, (Uniform, LogUniform, IntUniform)):
                ok = p.low < p.high and (not isinstance(p, LogUniform) or p.low > 0)
                _check(ok, f"space[{key!r}]", "low < high (and low > 0 for LogUniform)")
            elif isinstance(p, Grid):
                _check(len(p.values) > 0, f"space[{key!r}]", "at least one value")
            else:
                _check(False, f"space[{key!r}]", "Grid, Choice, Uniform, LogUniform or IntUniform")
        # the point is applied last: a swept key also fixed elsewhere would silently be swept
        for where, fixed in [("overrides", self.overrides), *self.variants.items()]:
            both = sorted(set(fixed) & set(self.space))
            _check(not both, f"space {both}", f"swept or fixed, not both (also in {where})")

    def _check_types(self) -> None:
        """What a spec file can get wrong that would otherwise fail deep inside the runner or
        Optuna, or run one point twice (a repeated seed or value is the same trial, with the
        same run directory)."""
        _check(isinstance(self.space, Mapping), "space", "a mapping of config key -> Grid, ...")
        _check(isinstance(self.overrides, Mapping), "overrides", "a mapping of config key -> value")
        _check(
            isinstance(self.variants, Mapping)
            and all(isinstance(v, Mapping) for v in self.variants.values()),
            "variants", "a mapping of name -> a mapping of overrides",
        )  # fmt: skip
        seeds = self.seeds
        _check(isinstance(seeds, tuple | list) and all(type(x) is int for x in seeds),
               "seeds", "a tuple of ints")  # fmt: skip
        # each is a trial's `seed` (config validation's range): refused here, not per trial
        _check(all(0 <= x < 2**32 for x in seeds), "seeds", f"in 0 .. 2**32 - 1 (got {seeds})")
        _check(len(set(seeds)) == len(seeds), "seeds", f"distinct (got {tuple(seeds)})")
        for field in ("budget", "sampler_seed"):
            _check(type(getattr(self, field)) is int, field, "an int")
        for key, p in self.space.items():
            if isinstance(p, Grid):
                _check(all(type(v) in (bool, int, float, str) for v in p.values),
                       f"space[{key!r}]", "values that are bools, ints, floats or strings (a "
                       "tuple-valued key takes a string: '1,8,1')")  # fmt: skip
                _check(len(set(p.values)) == len(p.values), f"space[{key!r}]",
                       f"distinct values (got {p.values})")  # fmt: skip
            elif isinstance(p, Uniform | LogUniform | IntUniform):
                kind = int if isinstance(p, IntUniform) else (int, float)
                ok = all(isinstance(x, kind) and not isinstance(x, bool) for x in (p.low, p.high))
                _check(ok and all(math.isfinite(x) for x in (p.low, p.high)), f"space[{key!r}]",
                       f"finite {'int' if kind is int else 'number'} bounds")  # fmt: skip

    def points(self) -> list[dict[str, Value] | None]:
        """The trials, each a parameter point (including `seed` and `variant`), or None for a
        TPE trial whose point is chosen when it starts (its seed is fixed now)."""
        axes: dict[str, tuple[Value, ...]] = {}
        if self.variants:
            axes["variant"] = tuple(self.variants)
        if self.algorithm == "grid":
            axes.update({k: p.values for k, p in self.space.items() if isinstance(p, Grid)})
            combos = [dict(zip(axes, c, strict=True)) for c in itertools.product(*axes.values())]
        elif self.algorithm == "random":
            rng = np.random.default_rng(self.sampler_seed)
            space = {**{k: Grid(v) for k, v in axes.items()}, **self.space}
            combos = [{k: _draw(p, rng) for k, p in space.items()} for _ in range(self.budget)]
        else:
            return [{"seed": s} for _ in range(self.budget) for s in self.seeds]
        return [{**c, "seed": s} for c in combos for s in self.seeds]

    def overrides_for(self, point: Mapping[str, Value]) -> dict[str, Any]:
        """Config overrides (dotted key -> value) of one trial."""
        out = dict(self.overrides)
        if "variant" in point:
            out.update(self.variants[str(point["variant"])])
        out.update({k: v for k, v in point.items() if k != "variant"})
        return out


def ablation(
    name: str,
    config: str,
    variants: Mapping[str, Mapping[str, Any]],
    *,
    baseline: str = "baseline",
    seeds: tuple[int, ...] = (0, 1, 2),
    overrides: Mapping[str, Any] | None = None,
    data_seed: int = 0,
) -> Sweep:
    """Baseline plus named variants, each run with every seed. The data order is fixed by
    `data_seed`, so the seeds vary only the initialisation and every variant sees the same
    batches: differences come from the change, not from the data."""
    if baseline not in variants:
        variants = {baseline: {}, **variants}
    return Sweep(
        name=name,
        config=config,
        overrides={"data.seed": data_seed, **(overrides or {})},
        variants=variants,
        baseline=baseline,
        algorithm="grid",
        seeds=tuple(seeds),
    )


def ladder(
    name: str,
    config: str,
    sizes: Mapping[str, Mapping[str, Any]],
    *,
    tokens_per_param: float,
    tokens_per_step: int,
    param_count: Any,
    seeds: tuple[int, ...] = (0,),
    overrides: Mapping[str, Any] | None = None,
    min_steps: int = 10,
) -> Sweep:
    """A size ladder for a scaling-law fit: one variant per model size, each trained for
    `tokens_per_param` tokens per parameter (compute ~ 6 N D grows with the size).
    `param_count(size_overrides) -> int` counts a size's parameters."""
    variants = {}
    for size, model in sizes.items():
        steps = max(min_steps, math.ceil(tokens_per_param * param_count(model) / tokens_per_step))
        variants[size] = {**model, "num_steps": steps}
    return Sweep(
        name=name,
        config=config,
        overrides={"data.seed": 0, **(overrides or {})},
        variants=variants,
        algorithm="grid",
        seeds=tuple(seeds),
    )


def load(path: str | Path) -> Sweep:
    """Runs a spec file's `get_sweep()`. Spec files are Python: only load your own."""
    get_sweep = load_python_function(
        path, "get_sweep", "sweep spec", "Specs live in experiments/NAME/sweep.py."
    )
    spec = get_sweep()
    if not isinstance(spec, Sweep):
        raise ConfigError(f"sweep spec: get_sweep() in {path} must return a bigjax.sweep.Sweep.")
    return spec


def _draw(p: Param, rng: np.random.Generator) -> Value:
    if isinstance(p, Grid):
        return p.values[int(rng.integers(len(p.values)))]
    if isinstance(p, Uniform):
        return float(rng.uniform(p.low, p.high))
    if isinstance(p, LogUniform):
        return float(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))
    return int(rng.integers(p.low, p.high + 1))


def _check(ok: bool, field: str, want: str) -> None:
    if not ok:
        raise ConfigError(f"sweep spec: {field} must be {want}.")


def suggest_point(spec: Sweep, trial: optuna.Trial) -> dict[str, Value]:
    """The trial's parameter point: fixed by its enqueued values, else chosen by the sampler."""
    point: dict[str, Value] = {}
    if spec.variants:
        point["variant"] = trial.suggest_categorical("variant", list(spec.variants))
    for key, p in spec.space.items():
        if isinstance(p, Grid):
            choice = trial.suggest_categorical(key, list(p.values))
            assert choice is not None  # one of p.values, which hold no None
            point[key] = choice
        elif isinstance(p, Uniform):
            point[key] = trial.suggest_float(key, p.low, p.high)
        elif isinstance(p, LogUniform):
            point[key] = trial.suggest_float(key, p.low, p.high, log=True)
        elif isinstance(p, IntUniform):
            point[key] = trial.suggest_int(key, p.low, p.high)
    point["seed"] = trial.suggest_categorical("seed", list(spec.seeds))
    return point
