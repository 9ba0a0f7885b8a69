"""Evaluation during and after training: the held-out loss (or a classifier's accuracy and
F1), multiple-choice accuracy and lm-evaluation-harness benchmarks, logged at a step.

lm-evaluation-harness tasks (HellaSwag, ARC, PIQA, LAMBADA, MMLU, your own YAML) are scored by
a bigjax model in process. `make_lm` gives lm-eval a `TemplateLM`: lm-eval builds the requests
(few-shot contexts, choice continuations, rolling windows) and tokenizes them through
`tok_encode`, which reads text as `bigjax serve` does; bigjax scores them with
`scoring.Scorer` (batched, one compile per length bucket) and generates with the serving
engine (continuous batching, stop strings cut as the server cuts them). So the same task
scored here and through lm-eval's `local-completions` against `bigjax serve` sees the same
token ids. Nothing is downloaded: tasks whose data lie in local files (`--include-path`) run
offline; the Hugging Face hub is switched to offline mode before lm-eval is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bigjax import choices, lora, metrics, progress, tree
from bigjax.config import ConfigError
from bigjax.data.tokenizer import Tokenizer
from bigjax.program import Program
from bigjax.sharding import Rules
from bigjax.tasks import task_of
from bigjax.tree import Params

if TYPE_CHECKING:  # lm-eval is an extra, imported when a harness runs
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager


class EvalStopped(Exception):
    """A stop was asked during an eval: it is left unfinished, and the run saves and stops
    (its relaunch evaluates that step again)."""


class Stop(Protocol):
    """What an eval asks of the run's stop (`signals.StopVote`)."""

    def poll(self) -> bool:
        """Whether to stop now: every process calls it at the same point of the same pass."""
        ...

    def mine(self) -> int:
        """This process's vote, with no collective (0: go on)."""
        ...

    def hear(self, verdict: int) -> None:
        """Takes a verdict another process shared."""
        ...


def raising(stop: Callable[[], bool]) -> Callable[[], None]:
    """`stop` as a check between batches: raises EvalStopped once it says stop."""

    def check() -> None:
        if stop():
            raise EvalStopped

    return check


def run_eval(prog: Program, params: Params, bar: progress.Bar | None = None,
             between: Callable[[], None] | None = None) -> dict[str, float]:  # fmt: skip
    """Loss and perplexity (or, for a classifier, accuracy and macro F1) over the first
    `eval.num_batches` batches of the held-out split, read once in a fixed order so every
    eval of every run sees the same tokens; `bar` counts the batches (`bigjax eval`; a
    training run's evals print one line instead). `between` runs before each batch (it may
    raise EvalStopped). A split that runs out before eval.num_batches is scored once, not
    repeated: rows past its end are blank (weight 0), the eval ends at the first batch blank
    on every process, and the row's `eval_batches` says how many batches held data."""
    cfg = prog.cfg
    it = prog.batches("validation", seed=0, shuffle=False, workers=0)
    nll, weight, adv = 0.0, 0.0, 0.0
    confusion = np.zeros((0, 0))  # [true class, predicted class], summed over batches
    # batches read, and up to the last with weight (a zero-weight batch before one with
    # weight is data: an SFT row of prompt alone); ran_out: the split ended before the count
    read, held, ran_out = 0, 0, False
    # one batch at a time: a list of them all held eval.num_batches batches in host memory
    for i, local in enumerate(itertools.islice(it, cfg.eval.num_batches)):
        try:
            if between is not None:
                between()
        except EvalStopped:
            it.close()  # its reading thread
            raise
        # blank everywhere, and so is every later batch: scoring them adds nothing (a huge
        # eval.num_batches over a small split would run that many empty steps)
        if _everywhere(it.spent):
            ran_out = True
            if bar is not None:
                bar.skip(cfg.eval.num_batches - i, "the held-out split ended")
            break
        out = jax.device_get(prog.eval_step(params, prog.to_global(local)))
        nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight_sum"])
        read, held = i + 1, (i + 1 if float(out["weight_sum"]) > 0 else held)
        if "confusion" in out:
            confusion = out["confusion"] + (confusion if confusion.size else 0.0)
        adv = adv + float(out.get("adv_nll_sum", 0.0))
        if bar is not None:
            bar.advance()
    it.close()
    loss = nll / max(weight, 1.0)
    row = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if held < read or ran_out:
        row["eval_batches"] = held
    if cfg.robust.eval_attack != "none":  # the loss under the embedding-space attack
        row["eval_adv_loss"] = adv / max(weight, 1.0)
    if task_of(cfg).classifies:  # accuracy, macro precision / recall / F1
        row.update(choices.classification_metrics(confusion))
    return row


def _everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every process: all take the same branch (the eval steps are
    collectives, so one process leaving alone would leave the others waiting)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(flag)).all())


class Evaluator:
    """Eval loss (and, with eval.choices, multiple-choice accuracy) at a step, logged.
    The scorer is compiled once, on the first call. `stop` is asked between batches, and
    between the benchmarks' scoring batches: a preempted run must not spend its notice
    period on an eval (EvalStopped; nothing of the unfinished eval is logged)."""

    def __init__(self, prog: Program, writers: metrics.Writers, stop: Stop | None = None):
        cfg, tokenizer = prog.cfg, prog.resources.tokenizer
        self.prog, self.writers, self.tokenizer = prog, writers, tokenizer
        self.between = raising(stop.poll) if stop is not None else None
        self.items = prog.resources.choice_items  # read with the run's other resources
        self.scorer: choices.Scorer | None = None  # made at the first eval that scores items
        self.harness = Harness(prog, tokenizer, stop) if cfg.eval.harness_tasks else None

    def __call__(self, at_step: int, params: Params) -> dict[str, float]:
        row = {"step": at_step, **run_eval(self.prog, params, between=self.between)}
        text = f"eval @ {at_step}: loss {row['eval_loss']:.4f}"
        if "f1" in row:  # a classifier: perplexity would mean nothing
            text += f", accuracy {row['accuracy']:.1%}, macro F1 {row['f1']:.3f}"
        else:
            text += f", ppl {row['eval_ppl']:.2f}"
        if "eval_batches" in row:
            text += (f" (the held-out split ran out after {row['eval_batches']} of "
                     f"eval.num_batches={self.prog.cfg.eval.num_batches} batches)")  # fmt: skip
        if self.items:
            start = time.perf_counter()
            cfg = self.prog.cfg
            if self.scorer is None:
                self.scorer = choices.make_scorer(self.prog.graphdef, cfg.finetune.lora_scale)
            seq_len = cfg.data.seq_len
            row.update(choices.score_items(self.scorer, params, self.tokenizer, self.items,
                                           seq_len, between=self.between))  # fmt: skip
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

    def __init__(self, prog: Program, tokenizer: Tokenizer, stop: Stop | None = None):
        e = prog.cfg.eval
        self.stop = stop
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.harness_tasks needs lm-evaluation-harness: "
                              "pip install 'bigjax[harness]'.")  # fmt: skip
        self.prog, self.tokenizer = prog, tokenizer
        self.tasks = [t for t in e.harness_tasks.split(",") if t]
        self.manager = task_manager(self.tasks, e.harness_include_path)
        check_data(self.tasks, self.manager, e.harness_include_path)
        self.lm: Any = None

    def __call__(self, params: Params) -> dict[str, float]:
        cfg = self.prog.cfg
        merged = lora.merged(params, cfg.finetune.lora_scale)
        if self.lm is None:
            p = self.prog
            self.lm = make_lm(p.graphdef, merged, self.tokenizer, cfg.data.seq_len,
                              rules=cfg.mesh.rules, mesh=p.mesh, stop=self.stop)  # fmt: skip
        self.lm.set_params(merged)
        start = time.perf_counter()
        results = evaluate(
            self.lm, self.tasks, include_path=cfg.eval.harness_include_path,
            limit=cfg.eval.harness_limit or None, manager=self.manager,
        )  # fmt: skip
        scores = {f"harness/{k}": v for k, v in headline(results).items()}
        return {**scores, "harness_eval_s": time.perf_counter() - start}

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()


def _offline() -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")


def make_lm(
    graphdef: nnx.GraphDef, params: tree.Params, tokenizer: Tokenizer, max_len: int, *,
    rules: Rules = (), mesh: Mesh | None = None, tokens: int = 8192, slots: int = 8,
    stop: Stop | None = None,
) -> TemplateLM:  # fmt: skip
    """An lm-eval LM over a model's parameters. `stop` is polled between scoring batches and
    before the generations (EvalStopped, to leave the evaluation), and asked between the
    generations' events too: lm-eval hands over all generations in one call. On several
    processes, process 0 schedules the engine and the others make the calls it broadcasts
    (`Engine.follow`), so there is no batch boundary all share for a poll: process 0 asks
    its own vote between events, and shares its verdict with its texts; a stop that reaches
    another process alone is polled when the pass ends. Every process takes process 0's
    texts: each engine scheduling its own would make the same calls only while the threads'
    timing agreed (a stop string seen a step later frees a slot a step later)."""
    _offline()
    from lm_eval.api.model import TemplateLM

    from bigjax.data.tokenizer import encode_prompt
    from bigjax.scoring import Scorer
    from bigjax.serving import hosts, offline
    from bigjax.serving.engine import Engine, Params

    between = raising(stop.poll) if stop is not None else None  # every process, in step
    # process 0 alone, between the events of a pass it leads
    asked_here = raising(lambda: stop.mine() != 0) if stop is not None else None

    class BigjaxLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = Scorer(graphdef, params, max_len, tokens=tokens, between=between)
            self.params = params
            self._engine: Engine | None = None

        def set_params(self, new: tree.Params) -> None:
            """Scores the next evaluation with `new` (a training run's current parameters:
            same shapes, so nothing compiles again)."""
            self.params = self.scorer.params = new
            if self._engine is not None:
                self._engine.params = new

        @property
        def eot_token_id(self) -> int:
            return int(tokenizer.eos_id)

        @property
        def prefix_token_id(self) -> int:
            return int(tokenizer.bos_id)  # training framed every document with BOS

        @property
        def max_length(self) -> int:
            return max_len

        def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
            return encode_prompt(tokenizer, string, add_bos=False)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  **kwargs: Any) -> list[tuple[float, bool]]:  # fmt: skip
            scored = self.scorer.score([(ctx, cont) for _, ctx, cont in requests])
            out = [(s.total, s.greedy) for s in scored]
            for (key, _, _), result in zip(requests, out, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
            return out

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            pairs, owner = [], []
            for i, req in enumerate(requests):
                windows = get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=max_len, context_len=1,
                )  # fmt: skip
                for ctx, cont in map(make_disjoint_window, windows):
                    pairs.append((ctx, cont))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, s in zip(owner, self.scorer.score(pairs), strict=True):
                totals[i] += s.total
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            if between is not None:
                between()
            if self._engine is None:
                self._engine = Engine(graphdef, self.params, rules, slots=slots, max_len=max_len,
                                      max_waiting=4 * slots, mesh=mesh)  # fmt: skip
                self._engine.warm_up()
                if self._engine.leads:
                    self._engine.start()
            if not self._engine.leads:  # process 0 schedules; this one makes its calls
                self._engine.follow()
                texts, stopped = hosts.broadcast_outcome(None, 0)
                if stopped and stop is not None:
                    stop.hear(stopped)  # the run's closing lines name the signal
                    raise EvalStopped
                if texts is None:
                    raise RuntimeError("generation failed on process 0 (its log says why)")
                return texts
            if jax.process_count() == 1:  # a stop is asked between its events
                return offline.complete(self._engine, tokenizer, *self._read(requests), between)
            texts, stopped = None, 0
            try:
                texts = offline.complete(self._engine, tokenizer, *self._read(requests),
                                         asked_here)  # fmt: skip
            except EvalStopped:
                if stop is not None:  # its verdict, as a vote read would record it
                    stopped = stop.mine()
                    stop.hear(stopped)
                raise
            finally:  # the followers wait for the pass's end and its texts, failed or not
                self._engine.end_pass()
                hosts.broadcast_outcome(texts, stopped)
            return texts

        def _read(self, requests: list) -> tuple[list[list[int]], list[Params], list[list[str]]]:
            """lm-eval's generation requests as the engine's prompts, settings and stops."""
            prompts, settings, stops = [], [], []
            for req in requests:
                context, kwargs = req.args
                kwargs = dict(kwargs)
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                budget = int(kwargs.pop("max_gen_toks", 256))
                budget = min(budget, max_len - 1)
                ids = self.tok_encode(context)[-(max_len - budget) :] or [self.prefix_token_id]
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                if not kwargs.pop("do_sample", False):
                    temperature = 0.0
                prompts.append(ids)
                settings.append(Params(max_tokens=budget, temperature=temperature,
                                       stop_ids=frozenset({self.eot_token_id})))  # fmt: skip
                stops.append(until)
            return prompts, settings, stops

        def close(self) -> None:
            if self._engine is not None:
                self._engine.stop()

    return BigjaxLM()


def task_manager(tasks: Sequence[str], include_path: str = "") -> TaskManager:
    """lm-eval's task index (built once: indexing every task takes seconds), with `tasks`
    checked against it."""
    _offline()
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"eval: include path {include_path}: no such directory.")
    include_path = str(Path(include_path).resolve()) if include_path else ""
    if include_path:  # indexing lm-eval's own thousands of tasks takes seconds: only if needed
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(manager.match_tasks([t]) for t in tasks):
            return manager
    manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(
            f"eval: unknown task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, "
            "or give the directory of their YAML files (--include-path)."
            + (_unreadable_yamls(Path(include_path)) if include_path else "")
        )
    return manager


def _unreadable_yamls(root: Path) -> str:
    """What lm-eval's index skipped under `root` (it says so at debug level only): YAML files
    that do not parse, each with where and why, so a task file with a typo is not reported
    as a task that does not exist. Tags (`!function`) are not resolved: syntax alone."""
    import yaml

    class AnyTag(yaml.SafeLoader):
        pass

    AnyTag.add_multi_constructor("!", lambda loader, suffix, node: None)
    bad = []
    for path in sorted(root.rglob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            yaml.load(text, Loader=AnyTag)  # safe: plain data
        except (OSError, yaml.YAMLError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            why = getattr(e, "problem", None) or type(e).__name__
            bad.append(f"{path.relative_to(root)}{where}: {why}")
    if not bad:
        return ""
    return (f" lm-eval skipped {len(bad)} YAML file(s) under {root} that do not parse: "
            + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else ""))  # fmt: skip


def evaluate(lm: TemplateLM, tasks: Sequence[str], *, include_path: str = "",
             limit: float | None = None, num_fewshot: int | None = None, seed: int = 1234,
             manager: TaskManager | None = None,
             ) -> dict[str, Any]:  # fmt: skip
    """lm-eval's `simple_evaluate` on `lm`; the results dict lm-eval writes."""
    import lm_eval

    manager = manager or task_manager(tasks, include_path)
    with _task_data(include_path):
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                bootstrap_iters=0,
            )  # fmt: skip
        except ValueError as e:
            # `random.sample`'s words, from lm-eval drawing the few-shot examples
            if num_fewshot and "larger than population" in str(e):
                raise ConfigError(f"eval: --num-fewshot {num_fewshot} is more examples than a "
                                  "task's few-shot split holds; lower it.") from None  # fmt: skip
            raise
    if results is None:
        raise ConfigError("eval: lm-eval returned no results (a non-zero rank?)")
    return dict(results)


def check_data(tasks: Sequence[str], manager: TaskManager, include_path: str = "") -> None:
    """Loads the tasks and their datasets once, so that a training run whose eval needs a
    dataset this (offline) machine lacks is refused at its start, not at its first eval."""
    with _task_data(include_path):
        manager.load(list(tasks))  # builds each task, which reads its dataset


@contextlib.contextmanager
def _task_data(include_path: str) -> Iterator[None]:
    """Where lm-eval reads task data: relative data_files in the task YAMLs from the include
    directory. A dataset that offline `datasets` cannot find is a one-line error."""
    include_path = str(Path(include_path).resolve()) if include_path else ""
    where = contextlib.chdir(include_path) if include_path else contextlib.nullcontext()
    try:
        with where:
            yield
    except ConnectionError as e:  # `datasets` in offline mode, the dataset not cached
        raise ConfigError(
            f"eval: a task's dataset is not on this machine ({e}); bigjax evaluates "
            "offline: load it once where there is network (datasets.load_dataset) and "
            "copy the Hugging Face cache here (HF_HOME), or use tasks whose YAML reads "
            "local files (--include-path)."
        ) from None


def headline(results: dict[str, Any]) -> dict[str, float]:
    """`task/metric` -> value for every numeric metric lm-eval reported (filters and stderr
    left out): the numbers a training run logs and a report compares."""
    out = {}
    for task, numbers in results.get("results", {}).items():
        for key, value in numbers.items():
            name, _, _ = key.partition(",")
            if isinstance(value, int | float) and not name.endswith("_stderr"):
                out[f"{task}/{name}"] = float(value)
    return out


def table(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    return str(make_table(results))
