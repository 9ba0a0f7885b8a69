"""Evaluation during and after training: the held-out loss (or a classifier's accuracy and
F1), multiple-choice accuracy and lm-evaluation-harness benchmarks, logged at a step."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np

from bigjax import choices, lora, metrics, progress
from bigjax.config import ConfigError
from bigjax.data import pipeline
from bigjax.data.tokenizer import Tokenizer
from bigjax.program import Program
from bigjax.tasks import task_of
from bigjax.tree import Params


def run_eval(prog: Program, params: Params, bar: progress.Bar | None = None) -> dict[str, float]:
    """Loss and perplexity (or, for a classifier, accuracy and macro F1) over the first
    `eval.num_batches` batches of the held-out split, read in a fixed order so every eval of
    every run sees the same tokens; `bar` counts the batches (`bigjax eval`; a training run's
    evals print one line instead)."""
    cfg = prog.cfg
    it = prog.batches("validation", seed=0, shuffle=False, workers=0)
    nll, weight, adv = 0.0, 0.0, 0.0
    confusion = np.zeros((0, 0))  # [true class, predicted class], summed over batches
    for local in pipeline.take(it, cfg.eval.num_batches):
        out = jax.device_get(prog.eval_step(params, prog.to_global(local)))
        nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight_sum"])
        if "confusion" in out:
            confusion = out["confusion"] + (confusion if confusion.size else 0.0)
        adv = adv + float(out.get("adv_nll_sum", 0.0))
        if bar is not None:
            bar.advance()
    it.close()
    loss = nll / max(weight, 1.0)
    row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if cfg.robust.eval_attack != "none":  # the loss under the embedding-space attack
        row["eval_adv_loss"] = adv / max(weight, 1.0)
    if task_of(cfg).classifies:  # accuracy, macro precision / recall / F1
        row.update(choices.classification_metrics(confusion))
    return row


class Evaluator:
    """Eval loss (and, with eval.choices, multiple-choice accuracy) at a step, logged.
    The scorer is compiled once, on the first call."""

    def __init__(self, prog: Program, writers: metrics.Writers):
        cfg, tokenizer = prog.cfg, prog.resources.tokenizer
        self.prog, self.writers, self.tokenizer = prog, writers, tokenizer
        self.items = prog.resources.choice_items  # read with the run's other resources
        self.scorer: choices.Scorer | None = None  # made at the first eval that scores items
        self.harness = Harness(prog, tokenizer) if cfg.eval.harness_tasks else None

    def __call__(self, at_step: int, params: Params) -> dict[str, float]:
        row = {"step": at_step, **run_eval(self.prog, params)}
        text = f"eval @ {at_step}: loss {row['eval_loss']:.4f}"
        if "f1" in row:  # a classifier: perplexity would mean nothing
            text += f", accuracy {row['accuracy']:.1%}, macro F1 {row['f1']:.3f}"
        else:
            text += f", ppl {row['eval_ppl']:.2f}"
        if self.items:
            start = time.perf_counter()
            cfg = self.prog.cfg
            if self.scorer is None:
                self.scorer = choices.make_scorer(self.prog.graphdef, cfg.finetune.lora_scale)
            seq_len = cfg.data.seq_len
            row.update(
                choices.score_items(self.scorer, params, self.tokenizer, self.items, seq_len)
            )
            row["mc_eval_s"] = time.perf_counter() - start
            text += f", multiple choice {row['mc_accuracy']:.1%}"
        if self.harness is not None:
            scores = self.harness(params)
            row.update(scores)
            text += f", {len(scores) - 1} benchmark numbers"
        self.writers.write(row, text)
        return row

    def close(self) -> None:
        """Stops what the evals started (the benchmarks' generation engine and its thread)."""
        if self.harness is not None:
            self.harness.close()


class Harness:
    """eval.harness_tasks at each eval: lm-evaluation-harness on the current parameters, as
    `harness/TASK/METRIC` numbers. The tasks are indexed and the programs compiled once, on
    the first eval; later evals hand the model new parameters of the same shapes."""

    def __init__(self, prog: Program, tokenizer: Tokenizer):
        import importlib.util

        from bigjax import harness

        e = prog.cfg.eval
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.harness_tasks needs lm-evaluation-harness: "
                              "pip install 'bigjax[harness]'.")  # fmt: skip
        self.prog, self.tokenizer = prog, tokenizer
        self.tasks = [t for t in e.harness_tasks.split(",") if t]
        self.manager = harness.task_manager(self.tasks, e.harness_include_path)
        harness.check_data(self.tasks, self.manager, e.harness_include_path)
        self.lm: Any = None

    def __call__(self, params: Params) -> dict[str, float]:
        from bigjax import harness

        cfg = self.prog.cfg
        merged = lora.merged(params, cfg.finetune.lora_scale)
        if self.lm is None:
            self.lm = harness.make_lm(self.prog.graphdef, merged, self.tokenizer,
                                      cfg.data.seq_len, rules=cfg.mesh.rules,
                                      mesh=self.prog.mesh)  # fmt: skip
        self.lm.set_params(merged)
        start = time.perf_counter()
        results = harness.evaluate(
            self.lm, self.tasks, include_path=cfg.eval.harness_include_path,
            limit=cfg.eval.harness_limit or None, manager=self.manager,
        )  # fmt: skip
        scores = {f"harness/{k}": v for k, v in harness.headline(results).items()}
        return {**scores, "harness_eval_s": time.perf_counter() - start}

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
