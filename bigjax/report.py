"""`bigjax report`: compare runs (ablations, sweeps, ladders) as a markdown table and plots.

Runs are grouped by what differs between them, with seeds pooled: an ablation's variant, a
sweep trial's parameters, or else the run directory's name. For each group: final and best
eval loss (mean ± std over seeds), the difference from the baseline (paired by seed when both
have the same seeds: every seed sees the same data in an ablation, so the pairing removes
the data's share of the noise), tokens, FLOPs and wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import statistics
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from bigjax import history
from bigjax.errors import BigjaxWarning, UsageError, shown_path
from bigjax.fit import PowerLaw, fit_power_law
from bigjax.metrics import curve, metric_value, read_jsonl_checked


class ReportError(UsageError, ValueError):
    """Nothing to report, or inputs that cannot be compared; the message says which."""


@dataclasses.dataclass(frozen=True)
class Run:
    path: Path
    group: str
    seed: int
    point: dict[str, Any]  # a sweep trial's parameters ({} for a plain run)
    baseline: str  # the baseline named by the run's sweep spec, if any
    train: list[tuple[int, float]]  # (step, train loss)
    evals: list[tuple[int, float]]  # (step, eval loss)
    tokens_per_step: float
    flops_per_step: float
    summary: dict[str, Any]
    # the final eval's lm-evaluation-harness numbers ('arc_easy/acc' -> 0.61), if any
    benchmarks: dict[str, float] = dataclasses.field(default_factory=dict)
    damaged_lines: list[int] = dataclasses.field(default_factory=list)  # of metrics.jsonl

    @property
    def final(self) -> float | None:
        if not self.summary.get("complete") or not self.evals:
            return None
        return self.evals[-1][1] if self.evals[-1][0] == self.summary["step"] else None

    @property
    def best(self) -> float | None:
        return min((loss for _, loss in self.evals if not math.isnan(loss)), default=None)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (those holding metrics.jsonl) at or below the given paths; each path
    must hold at least one (a mistyped one would silently drop out of the comparison)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"report: no such directory {str(p)!r}")
        found_here = [p / "metrics.jsonl"] if (p / "metrics.jsonl").is_file() else sorted(
            p.glob("**/metrics.jsonl"))  # fmt: skip
        # A FIFO, socket or device by that name would block or never end: left out, and said.
        for odd in (m for m in found_here if not m.is_file()):
            warnings.warn(f"report: {shown_path(odd)} is not a regular file; that run is left "
                          "out.", BigjaxWarning, 2)  # fmt: skip
        runs = [m.parent for m in found_here if m.is_file()]
        if not runs:
            raise ReportError(
                f"report: no runs under {p} (a run directory holds metrics.jsonl: pass run "
                "directories or a sweep directory)"
            )
        found += runs
    return sorted(set(found))


def load_run(path: Path) -> Run:
    """A run as its files describe it. metrics.jsonl is read as `read_jsonl` reads it (a
    damaged line is skipped, warned and listed in the report) and a damaged value in a row is
    skipped with it; a field of the wrong type in summary.json, config.json or trial.json is
    named, as an unreadable file is: a report must not average what a damaged file says."""
    try:
        rows, damaged = read_jsonl_checked(path / "metrics.jsonl")
    except OSError as e:
        raise ReportError(f"report: {path / 'metrics.jsonl'} is unreadable ({e.strerror}); "
                          "leave that run out of the report.") from None  # fmt: skip
    if damaged:  # bit rot or an edit: what the report shows of this run lacks those rows
        warnings.warn(f"report: {shown_path(path)}: {_damage(damaged)}", BigjaxWarning, 2)
    config, trial, summary = (_json_object(path / n) for n in ("config.json", "trial.json",
                                                               "summary.json"))  # fmt: skip
    point: dict[str, Any] = dict(_get(trial, "point", {}, path / "trial.json"))
    seed = (_get(point, "seed", 0, path / "trial.json") if "seed" in point
            else _get(config, "seed", 0, path / "config.json"))  # fmt: skip
    point.pop("seed", None)
    if "variant" in point and len(point) == 1:
        group = str(point["variant"])
    elif point:
        group = ", ".join(f"{k}={_fmt(v)}" for k, v in point.items())
    else:
        group = shown_path(path.name)  # a name that is not UTF-8 as \xNN: matplotlib, markdown
    data: dict[str, Any] = _get(config, "data", {}, path / "config.json")
    batch, seq = (_get(data, k, 0, path / "config.json") for k in ("batch_size", "seq_len"))
    summary = {k: _get(summary, k, default, path / "summary.json") for k, default in SUMMARY}
    steps = summary["step"]
    return Run(
        path=path,
        group=group,
        seed=seed,
        point=point,
        baseline=_get(trial, "baseline", "", path / "trial.json"),
        train=curve(rows, "loss"),
        evals=curve(rows, "eval_loss"),
        tokens_per_step=float(batch * seq),
        flops_per_step=summary["flops"] / steps if steps else 0.0,
        summary=summary,
        benchmarks=_final_benchmarks(rows, summary),
        damaged_lines=damaged,
    )


# what the report reads of summary.json, with the value of a run that has none
SUMMARY = (("step", 0), ("complete", False), ("tokens", 0.0), ("flops", 0.0), ("wall_s", 0.0))
T = TypeVar("T")


def _get(doc: dict[str, Any], key: str, default: T, path: Path) -> T:
    """doc[key] (`default` if absent), which must have the default's type: any number where
    it is a float (null is a non-finite number, as bigjax writes one); `type(...) is`, as
    JSON has no subclasses and a bool must not pass for an int."""
    value: Any = doc.get(key, default)
    if isinstance(default, float):
        if value is None:
            return cast(T, math.nan)
        if type(value) in (int, float):
            return cast(T, float(value))
    elif type(value) is type(default):
        return value
    kind = "a number" if isinstance(default, float) else f"a JSON {_JSON[type(default)]}"
    raise ReportError(f"report: {path}: {key!r} is {value!r}, not {kind}; restore the file or "
                      "leave that run out of the report.")  # fmt: skip


_JSON = {int: "integer", bool: "boolean", str: "string", dict: "object"}


def _json_object(path: Path) -> dict[str, Any]:
    """A run's JSON file as a dict ({} if the run has none); a damaged one is named."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ReportError(f"report: {path} is unreadable ({e}); restore it or leave that run "
                          "out of the report.") from None  # fmt: skip
    if not isinstance(value, dict):
        raise ReportError(f"report: {path} holds no JSON object; restore it or leave that run "
                          "out of the report.")  # fmt: skip
    return value


def _final_benchmarks(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, float]:
    """The harness numbers of a finished run's eval at its last step (a run cut short has
    none: its numbers would not compare)."""
    for r in reversed(rows):
        found = {
            k[len("harness/") :]: metric_value(v) for k, v in r.items() if k.startswith("harness/")
        }
        if found:
            done = summary["complete"] and r["step"] == summary["step"]
            return {k: v for k, v in found.items() if v is not None} if done else {}
    return {}


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return groups


def delta(group: list[Run], base: list[Run]) -> str:
    """Final-loss difference from the baseline: paired by seed when the seeds match."""
    mine = {r.seed: r.final for r in group if r.final is not None}
    theirs = {r.seed: r.final for r in base if r.final is not None}
    if not mine or not theirs:
        return "—"
    if set(mine) == set(theirs):
        diffs = [mine[s] - theirs[s] for s in sorted(mine)]
        if len(diffs) == 1:
            return f"{diffs[0]:+.4f}"
        return f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} (paired)"
    return f"{statistics.mean(mine.values()) - statistics.mean(theirs.values()):+.4f}"


def table(runs: list[Run], baseline: str = "") -> str:
    groups = group_runs(runs)
    if baseline and baseline not in groups:
        raise ReportError(
            f"report: --baseline {baseline!r} is not one of the groups: {', '.join(groups)}"
        )
    header = "| group | seeds | final eval loss | best eval loss | Δ final vs baseline | "
    header += "tokens | FLOPs | wall time |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]

    def order(name: str) -> tuple:
        finals = [r.final for r in groups[name] if r.final is not None]
        mean = statistics.mean(finals) if finals else math.nan
        return (name != baseline, math.inf if math.isnan(mean) else mean)

    for name in sorted(groups, key=order):
        g = groups[name]
        finals = [r.final for r in g if r.final is not None]
        bests = [r.best for r in g if r.best is not None]
        d = "(baseline)" if name == baseline else delta(g, groups[baseline]) if baseline else "—"
        tokens = statistics.mean(r.summary["tokens"] for r in g)
        flops = statistics.mean(r.summary["flops"] for r in g)
        wall = statistics.mean(r.summary["wall_s"] for r in g)
        incomplete = sum(r.final is None for r in g)
        seeds = f"{len(g)}" + (f" ({incomplete} unfinished)" if incomplete else "")
        lines.append(
            f"| {_cell(name)} | {seeds} | {_mean_std(finals)} | {_mean_std(bests)} | {d} | "
            f"{tokens:,.0f} | {flops:.3g} | {wall:.0f} s |"
        )
    return "\n".join(lines)


def benchmark_table(runs: list[Run], baseline: str = "") -> str:
    """Benchmark accuracy per group: mean ± std over seeds, and the difference from the
    baseline's mean; '' when no run scored benchmarks."""
    names = sorted({k for r in runs for k in r.benchmarks})
    if not names:
        return ""
    groups = group_runs(runs)
    lines = ["| group | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for group, g in sorted(groups.items(), key=lambda kv: kv[0] != baseline):
        cells = []
        for name in names:
            xs = [r.benchmarks[name] for r in g if name in r.benchmarks]
            base = [r.benchmarks[name] for r in groups.get(baseline, []) if name in r.benchmarks]
            d = ""
            if xs and base and group != baseline:
                d = f" ({statistics.mean(xs) - statistics.mean(base):+.4f})"
            cells.append(_mean_std(xs) + d)
        lines.append(f"| {_cell(group)} | {len(g)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """`text` in a Markdown table cell: a `|` in a run's name ended the cell early."""
    return " ".join(text.splitlines()).replace("|", "\\|")


def _damage(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if lines[10:] else "")
    return f"metrics.jsonl line{'s' * (len(lines) > 1)} {shown} damaged, skipped"


@contextlib.contextmanager
def _one_glyph_warning() -> Iterator[None]:
    """Matplotlib warns once per missing glyph and figure (a run named in Chinese: dozens of
    lines); this says it once, with the characters and the fix, and passes other warnings on."""
    with warnings.catch_warnings(record=True) as caught:
        # every glyph's warning, not the first per place; the other filters stay as they are
        # ("always" for all let libraries' hidden deprecations through: pyparsing's in
        # matplotlib's style files)
        warnings.filterwarnings("always", r"Glyph \d+ ", UserWarning)
        yield
    missing = set()
    for w in caught:
        # "missing from font(s) DejaVu Sans", or "from current font" (matplotlib < 3.10)
        if m := re.match(r"Glyph (\d+) .* missing from", str(w.message)):
            missing.add(chr(int(m.group(1))))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        warnings.warn(
            f"report: the plots' font has no glyph for {''.join(sorted(missing)[:10])}"
            f"{' and more' if len(missing) > 10 else ''}: run names show boxes there for them "
            "(report.md has them). Install a font that has them and name it in matplotlib's "
            "font.family, e.g. 'font.family: DejaVu Sans, Noto Sans CJK JP, sans-serif' in "
            "matplotlibrc.",
            BigjaxWarning,
            stacklevel=3,
        )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _colors(names: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "viridis"]
    n = max(len(names) - 1, 1)
    return {name: cmap(i if len(names) <= 10 else i / n) for i, name in enumerate(names)}


def plot_curves(runs: list[Run], out: Path) -> list[Path]:
    """Loss against steps, tokens and FLOPs; one colour per group, one line per seed."""
    plt = _pyplot()
    groups = group_runs(runs)
    colors = _colors(list(groups))
    written = []
    for axis, label in (("step", "step"), ("tokens", "tokens"), ("flops", "training FLOPs")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, g in groups.items():
            for i, r in enumerate(g):
                scale = {"step": 1.0, "tokens": r.tokens_per_step, "flops": r.flops_per_step}
                k = scale[axis]
                if r.train and axis == "step":
                    steps, losses = zip(*r.train, strict=True)
                    ax.plot(steps, losses, color=colors[name], alpha=0.25, lw=1)
                if r.evals:
                    steps, losses = zip(*r.evals, strict=True)
                    ax.plot(
                        [s * k for s in steps], losses, "o-", color=colors[name], ms=3, lw=1.2,
                        label=f"{name} (eval)" if i == 0 else None,
                    )  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("loss (faint: train; markers: eval)" if axis == "step" else "eval loss")
        if axis != "step":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # runs stopped before their first eval: none
            ax.legend(fontsize=7)
        written.append(_save(fig, out / f"loss_vs_{axis}.png"))
    return written


def plot_objective(runs: list[Run], out: Path) -> list[Path]:
    """Sweeps: final eval loss against each swept parameter (log axis for wide positive
    ranges); one point per run."""
    plt = _pyplot()
    keys = sorted({k for r in runs for k in r.point if k != "variant"})
    written = []
    for key in keys:
        pts = [(r.point[key], r.final) for r in runs if key in r.point and r.final is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = zip(*pts, strict=True)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys)
            if min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel("final eval loss")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"objective_vs_{key.replace('.', '_')}.png"))
    return written


def scaling_fit(runs: list[Run], out: Path) -> tuple[PowerLaw, Path]:
    """Fits L(C) = a C^-b + c to each group's mean final loss against its training FLOPs."""
    import numpy as np

    plt = _pyplot()
    points = []
    for name, g in group_runs(runs).items():
        finals = [r.final for r in g if r.final is not None]
        if finals:
            points.append((statistics.mean(r.summary["flops"] for r in g), np.mean(finals), name))
    if len(points) < 3:
        raise ReportError(
            f"report --fit scaling: need finished runs of at least 3 sizes, got {len(points)}"
        )
    points.sort()
    compute = np.array([p[0] for p in points])
    loss = np.array([p[1] for p in points])
    law = fit_power_law(compute, loss)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(compute, loss, zorder=3, label="runs (mean over seeds)")
    for c, lo, name in points:
        ax.annotate(name, (c, lo), textcoords="offset points", xytext=(4, 4), fontsize=7)
    grid = np.geomspace(compute.min() / 2, compute.max() * 4, 200)
    ax.plot(grid, law(grid), "r-", label=law.describe())
    ax.axhline(law.c, color="gray", ls=":", lw=1, label=f"irreducible c = {law.c:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final eval loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return law, _save(fig, out / "scaling_fit.png")


def report(
    paths: Sequence[str | Path], out: Path, baseline: str = "", fit: str = ""
) -> tuple[str, list[Path]]:
    """Writes report.md and the plots into `out`; returns the markdown and the PNG paths."""
    runs = [load_run(p) for p in find_runs(paths)]
    if not baseline:
        named = {r.baseline for r in runs if r.baseline}
        baseline = named.pop() if len(named) == 1 else ""
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Report: {len(runs)} runs", "", table(runs, baseline), ""]
    benchmarks = benchmark_table(runs, baseline)
    if benchmarks:
        md += ["## Benchmarks (lm-evaluation-harness, final eval; Δ vs baseline)", "",
               benchmarks, ""]  # fmt: skip
    if fit not in ("", "scaling"):
        raise ReportError(f"report: unknown --fit {fit!r}; the one fit is 'scaling'")
    with _one_glyph_warning():
        pngs = plot_curves(runs, out) + plot_objective(runs, out)
        if fit == "scaling":
            law, png = scaling_fit(runs, out)
            md += ["## Scaling fit", "", f"`{law.describe()}` (C in FLOPs)", ""]
            pngs.append(png)
    md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    md += ["## Runs", ""]
    for r in runs:
        damage = f"; {_damage(r.damaged_lines)}" if r.damaged_lines else ""
        md.append(f"- `{shown_path(r.path)}`: {r.group}, seed {r.seed}{damage}")
        segments = history.segments(r.path, r.summary["step"])
        if len(segments) > 1:  # resumed with another config: which one trained which steps
            md += [f"  - {s}" for s in segments]
    md.append("")
    text = "\n".join(md)
    (out / "report.md").write_text(text, encoding="utf-8")
    return text, pngs
