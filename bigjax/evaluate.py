"""`bigjax eval`: a trained run's validation loss, and its multiple-choice accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bigjax import progress
from bigjax.trained import open_run


def evaluate_run(workdir: str, overrides: Sequence[str], choices: str = "") -> dict[str, Any]:
    """Eval loss of the run's latest checkpoint, plus accuracy on `choices` (or the config's
    eval.choices): a JSONL path or 'stdlib'."""
    with open_run(workdir, overrides, "eval", reads_data=True) as (prog, params, step):
        from bigjax import choices as mc
        from bigjax.evals import run_eval

        cfg = prog.cfg
        choices = choices or cfg.eval.choices
        items = (
            mc.items_for(choices, cfg.data.eval_fraction, cfg.eval.choice_items) if choices else []
        )
        bar = progress.Bar("eval: held-out loss", cfg.eval.num_batches, "batches")
        result = {"step": step, **run_eval(prog, params, bar)}
        bar.close()
        if items:
            tokenizer = prog.resources.tokenizer
            bar = progress.Bar("eval: multiple choice", len(items), "items")
            scorer = mc.make_scorer(prog.graphdef)
            result.update(
                mc.score_items(scorer, params, tokenizer, items, cfg.data.seq_len, bar=bar),
                mc_items=len(items),
            )
            bar.close()
    return result


def harness_run(workdir: str, overrides: Sequence[str], tasks: Sequence[str], *,
                include_path: str = "", limit: float | None = None,
                num_fewshot: int | None = None) -> dict[str, Any]:  # fmt: skip
    """lm-evaluation-harness `tasks` on the run's latest intact checkpoint (lm-eval's results
    dict, with the checkpoint step under "bigjax_step")."""
    from bigjax import evals

    with open_run(workdir, overrides, "eval") as (prog, params, step):
        tokenizer = prog.resources.tokenizer
        lm = evals.make_lm(prog.graphdef, params, tokenizer, prog.cfg.data.seq_len,
                           rules=prog.cfg.mesh.rules, mesh=prog.mesh)  # fmt: skip
        try:
            results = evals.evaluate(lm, tasks, include_path=include_path, limit=limit,
                                     num_fewshot=num_fewshot)  # fmt: skip
        finally:
            lm.close()
    return {**results, "bigjax_step": step}
