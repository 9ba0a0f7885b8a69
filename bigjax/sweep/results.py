"""What a sweep's trials came to: each run's objective, the study's table and its failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bigjax.metrics import curve, read_jsonl


def read_evals(run_dir: Path) -> list[tuple[int, float]]:
    """(step, eval_loss) rows of a run's metrics.jsonl; a non-finite eval (written as null)
    is NaN, which the pruner is not told of."""
    path = run_dir / "metrics.jsonl"
    return curve(read_jsonl(path), "eval_loss") if path.is_file() else []


def saved_step(run_dir: Path) -> int:
    """The newest committed checkpoint step of a run directory, -1 without one: where a retry
    of its trial resumes. Orbax names a committed step by its number alone (one it is still
    writing has a suffix)."""
    steps = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=-1)


def objective_value(run_dir: Path, objective: str) -> float | None:
    """The trial's objective, or None when the run did not finish with a final eval."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    if not summary.get("complete") or summary.get("eval_loss") is None:
        return None
    if objective == "best_eval_loss":
        return min((loss for _, loss in read_evals(run_dir) if math.isfinite(loss)), default=None)
    return float(summary["eval_loss"])


def failures(study: optuna.Study) -> list[str]:
    """One line per trial that failed for good (an error, not an interruption, and no later
    trial of the same point completed): its number, point and last log line."""
    trials = study.get_trials(deepcopy=False)
    completed = [t.params for t in trials if t.state == TrialState.COMPLETE]
    out = []
    for t in trials:
        if t.state == TrialState.FAIL and "error" in t.user_attrs and t.params not in completed:
            last = t.user_attrs["error"].strip().splitlines()[-1]  # bigjax's own error line
            where = t.user_attrs.get("run_dir")
            log = f" (log: {where}/train.log)" if where else ""
            out.append(f"trial {t.number} {t.params}: {last}{log}")
    return out


def summary(study: optuna.Study) -> str:
    """A plain-text table of the study's trials, best first, then the failed ones."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    lines = [", ".join(f"{n.lower()} {c}" for n, c in states.items() if c)]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    for t in sorted(done, key=lambda t: float(t.values[0]), reverse=reverse):
        lines.append(f"  trial {t.number:4d}  {t.value:.4f}  {t.params}")
    lines += [f"  FAIL {line}" for line in failures(study)]
    return "\n".join(lines)
