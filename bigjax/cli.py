"""The `bigjax` command: subcommands, config loading and overrides, friendly errors."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bigjax.config import ConfigError, TrainConfig, from_configdict, load_python_function
from bigjax.tuning import without

USAGE_ERROR = 2  # bad config or input: fix the command
RUN_FAILED = 1  # the run itself failed (non-finite loss, checkpoint I/O)


def load_config(spec: str, overrides: Sequence[str]) -> TrainConfig:
    """Loads `path.py[:arg]`, applies `--config.a.b=value` overrides, converts strictly.

    A config file is Python by design (like big_vision): it is run, so only load your own.
    """
    path, _, arg = spec.partition(":")
    get_config = load_python_function(
        path, "get_config", "--config", "Configs live in configs/*.py."
    )
    cd = get_config(arg or None)
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


def _join_override_values(argv: Sequence[str]) -> list[str]:
    """Accepts both '--config.a=1' and '--config.a 1'."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--config.") and "=" not in item and i + 1 < len(argv):
            out.append(f"{item}={argv[i + 1]}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite numbers as null), as every file bigjax writes."""
    from bigjax.metrics import json_text  # imports jax: only once a command has run

    path.write_text(json_text(obj, indent=2) + "\n")


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: `bigjax --debug CMD` and `bigjax CMD --debug` both work.
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="full tracebacks on errors"
    )


def cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    cfg = load_config(args.config, overrides)
    from bigjax import distributed  # imports jax: keep `bigjax --help` and config errors fast
    from bigjax.train import train

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    train(cfg, args.workdir)
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if overrides:
        raise ConfigError("prepare takes no --config.* overrides; see bigjax prepare --help.")
    from bigjax.data.clean import QualityConfig
    from bigjax.data.prepare import PrepareConfig, prepare

    quality = None
    if not args.no_quality:
        quality = QualityConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(QualityConfig)}
        )
    prepare(
        PrepareConfig(
            inputs=tuple(args.input),
            output=args.output,
            tokenizer=args.tokenizer,
            text_field=args.text_field,
            normalize=not args.no_normalize,
            invalid_utf8=args.invalid_utf8,
            quality=quality,
            exact_dedup=not args.no_exact_dedup,
            near_dedup=not args.no_near_dedup,
            near_threshold=args.near_threshold,
            num_perm=args.num_perm,
            pii=not args.no_pii,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            strict=args.strict,
            languages=tuple(args.languages or ()),
            workers=args.workers,
        )
    )
    return 0


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    from bigjax.data.clean import NEAR_THRESHOLD, QualityConfig

    p = sub.add_parser(
        "prepare",
        help="clean, deduplicate, scrub and tokenize a corpus",
        description="Turn raw text (.txt/.md/.py files, .jsonl[.gz|.zst], .parquet, or "
        "'stdlib') into a prepared dataset: ArrayRecord token shards, tokenizer/, "
        "manifest.json and report.md.",
    )
    p.add_argument("--input", nargs="+", required=True, help="globs, or 'stdlib'")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="byte | bpe:VOCAB | sentencepiece:PATH | hf:PATH (default: byte)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--shard-tokens", type=int, default=64 * 2**20)
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unusable record instead of skipping and counting it",
    )
    p.add_argument("--invalid-utf8", choices=("repair", "drop"), default="repair")
    p.add_argument(
        "--near-threshold",
        type=float,
        default=NEAR_THRESHOLD,
        help="Jaccard of 5-unit shingles above which a document is a near duplicate",
    )
    p.add_argument(
        "--languages",
        nargs="+",
        metavar="CODE",
        help="keep only documents in these languages (ISO 639-1 tags as in the report: zh en)",
    )
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    for stage in ("normalize", "quality", "exact-dedup", "near-dedup", "pii"):
        p.add_argument(f"--no-{stage}", action="store_true", help=f"switch off {stage}")
    for f in dataclasses.fields(QualityConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=type(f.default),
            default=f.default,
            help=f"quality filter (default {f.default})",
        )
    add_debug_flag(p)
    p.set_defaults(run=cmd_prepare)


def cmd_plan(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from bigjax import plan

    cfg = load_config(args.config, overrides)
    if bool(args.topology) == bool(args.devices):
        raise ConfigError("plan: give either --topology (e.g. v5p-128) or --devices N.")
    target = (
        plan.parse_topology(args.topology)
        if args.topology
        else plan.gpu_target(args.devices, args.device_kind)
    )
    result = plan.plan(cfg, target, args.mfu, args.compile)
    print(plan.render(result))
    if args.json:
        write_json(Path(args.json), result)
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="pre-flight: memory, FLOPs and step time for a TPU slice or GPU cluster",
        description="Parameters, FLOPs, per-device memory and step time for a config on a "
        "target, without the target. With libtpu installed (pip install 'bigjax[tpu]') the "
        "train step is compiled ahead of time for the TPU topology on this machine.",
    )
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--topology", help="Cloud TPU slice: v4-32, v5p-128, v5e-16, v6e-8, ...")
    p.add_argument("--devices", type=int, help="number of GPUs (instead of --topology)")
    p.add_argument("--device-kind", default="H100", help="A100, H100 or H200 (with --devices)")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the step time")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile for the TPU topology (default: when libtpu is installed)",
    )
    p.add_argument("--json", help="also write the plan as JSON here")
    add_debug_flag(p)
    p.set_defaults(run=cmd_plan)


def cmd_bench(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    cfg = load_config(args.config, overrides)
    from bigjax import bench

    base = bench.QUICK if args.quick else bench.BenchSettings()
    settings = bench.BenchSettings(
        warmup=base.warmup if args.warmup is None else args.warmup,
        steps=base.steps if args.steps is None else args.steps,
    )
    baseline = None
    if args.baseline:
        path = Path(args.baseline)
        if not path.is_file():
            raise ConfigError(f"--baseline: no such file {args.baseline!r} (a bench --json).")
        baseline = json.loads(path.read_text())
    result = bench.bench(cfg, settings)
    print(bench.render(result, baseline))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.json), result)
        print(f"  written to {args.json}")
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time a config's train step: tokens/s, MFU, compile, data wait, host overhead",
        description="Compiles the config's train step and times it twice: alone on a "
        "resident batch (the device floor) and fed by the real pipeline as train runs it. "
        "Prints medians; --json writes everything, --baseline compares with an earlier --json.",
    )
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 5 timed steps")
    p.add_argument("--warmup", type=int, help="untimed steps before each timing (default 3)")
    p.add_argument("--steps", type=int, help="timed steps, median reported (default 10)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--baseline", help="an earlier --json to compare against (ratios)")
    add_debug_flag(p)
    p.set_defaults(run=cmd_bench)


def cmd_sweep(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if overrides:
        raise ConfigError("sweep: put config overrides in the spec (its `overrides` field).")
    from bigjax.sweep import runner, spec  # imports optuna: only for this command

    sweep = spec.load(args.spec)
    directory = Path(args.dir or f"runs/sweeps/{sweep.name}")
    opts = runner.Options(
        directory=directory,
        storage=args.storage or f"sqlite:///{directory.resolve() / 'study.db'}",
        workers=args.workers,
        join_only=args.worker,
        heartbeat_s=args.heartbeat,
    )
    study = runner.run(sweep, opts)
    print(runner.summary(study), flush=True)
    print(f"report: bigjax report {directory}", flush=True)
    return 0


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a sweep or ablation spec (experiments/NAME/sweep.py)",
        description="Run the trials of a sweep or ablation spec as `bigjax train` processes, "
        "N at a time, recorded in an Optuna study. Rerun the same command to continue a "
        "stopped or killed sweep; add --worker on other machines to join it.",
    )
    p.add_argument("spec", help="a Python file defining get_sweep()")
    p.add_argument("--workers", type=int, default=1, help="trials at a time on this machine")
    p.add_argument("--worker", action="store_true", help="join an existing sweep's study")
    p.add_argument("--storage", help="study database URL (default: SQLite in the sweep dir)")
    p.add_argument("--dir", help="sweep directory (default: runs/sweeps/NAME)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    add_debug_flag(p)
    p.set_defaults(run=cmd_sweep)


def cmd_report(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if overrides:
        raise ConfigError("report: takes run or sweep directories, not config overrides.")
    from bigjax import report

    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first / "report" if len(args.paths) == 1 else None)
    if out is None:
        raise ConfigError("report: with several directories, say where to write: --out DIR.")
    text, pngs = report.report(args.paths, out, baseline=args.baseline, fit=args.fit)
    print(text)
    print(f"written: {out / 'report.md'} and {len(pngs)} plots in {out}", flush=True)
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="compare runs: markdown table and plots",
        description="Compare runs (run directories, or sweep directories holding them): "
        "final and best eval loss per group (mean ± std over seeds), Δ vs the baseline, "
        "tokens, FLOPs, wall time; loss plots; objective-vs-parameter plots for sweeps.",
    )
    p.add_argument("paths", nargs="+", help="run or sweep directories")
    p.add_argument("--out", help="output directory (default: PATH/report for one path)")
    p.add_argument("--baseline", default="", help="group to compare with (default: the spec's)")
    p.add_argument("--fit", default="", choices=["", "scaling"], help="scaling: fit L(C)")
    add_debug_flag(p)
    p.set_defaults(run=cmd_report)


@contextlib.contextmanager
def open_run(workdir: str, overrides: Sequence[str], command: str) -> Iterator[tuple]:
    """A trained run, ready to use on this machine: yields (program, params, checkpoint step)
    inside its mesh. The config is the run's config.json plus overrides; the mesh is FSDP over
    this machine's devices, whatever mesh the run trained on."""
    import dataclasses as dc

    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{command}: {workdir} has no config.json; pass a run directory.")
    raw = json.loads(config_path.read_text())
    for item in overrides:
        set_path(raw, *parse_override(item))
    cfg = from_configdict(raw)
    cfg = dc.replace(cfg, mesh=dc.replace(cfg.mesh, shape=(1, -1, 1), dcn_shape=(1, 1, 1)))
    import jax

    from bigjax import checkpoint, lora
    from bigjax.mesh import make_mesh
    from bigjax.program import make_program

    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        prog = make_program(cfg, mesh)
        target = checkpoint.restore_target(prog.abstract, prog.shardings).params
        params, step = checkpoint.load_params(workdir, target)
        # LoRA runs: the adapters folded into the weights, as the model ran in training
        yield prog, lora.merged(params, cfg.finetune.lora_scale), step


def cmd_eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    with open_run(args.workdir, overrides, "eval") as (prog, params, step):
        from bigjax import evaluate
        from bigjax.data import pipeline
        from bigjax.train import run_eval

        cfg = prog.cfg
        choices = args.choices or cfg.eval.choices
        items = (
            evaluate.items_for(choices, cfg.data.eval_fraction, cfg.eval.choice_items)
            if choices
            else []
        )
        result = {"step": step, **run_eval(prog, params)}
        if items:
            tokenizer = pipeline.tokenizer_for(cfg.data)
            result.update(
                evaluate.score_items(
                    evaluate.make_scorer(prog.graphdef), params, tokenizer, items, cfg.data.seq_len
                ),
                mc_items=len(items),
            )
    for key, value in result.items():
        print(f"  {key:18s} {value:.4f}" if isinstance(value, float) else f"  {key:18s} {value}")
    if args.json:
        write_json(Path(args.json), result)
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss/perplexity and multiple-choice accuracy of a run",
        description="Evaluate a run's latest checkpoint: loss and perplexity on the held-out "
        "split (eval.num_batches batches; override with --config.eval.num_batches=N) and, "
        "with --choices, multiple-choice accuracy by log-likelihood.",
    )
    p.add_argument("--workdir", required=True, help="the run directory")
    p.add_argument(
        "--choices",
        help="multiple choice: 'stdlib' (built-in next-line task) or a JSON-lines file of "
        "{context, choices: [...], answer: index} (default: the run's eval.choices)",
    )
    p.add_argument("--json", help="also write the results here")
    add_debug_flag(p)
    p.set_defaults(run=cmd_eval)


def cmd_generate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    import time

    sampling = _sampling(args)
    with open_run(args.workdir, overrides, "generate") as (prog, params, step):
        import jax

        from bigjax import generate
        from bigjax.data import pipeline

        tokenizer = pipeline.tokenizer_for(prog.cfg.data)
        prompts = [tokenizer.encode(p).tolist() for p in args.prompt]
        batch = generate.left_pad(prompts)
        fn = generate.make_generate(prog.graphdef, prog.cfg.mesh.rules, sampling)
        inputs = (params, batch["tokens"], batch["valid"], batch["positions"])
        start = time.perf_counter()
        compiled = fn.lower(*inputs).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        out, lengths = jax.device_get(compiled(*inputs))
        seconds = time.perf_counter() - start
    for prompt, row, n in zip(args.prompt, out, lengths, strict=True):
        print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(row[:n])}", flush=True)
    tokens = int(sum(lengths))
    print(
        f"generate: checkpoint step {step}, {len(prompts)} prompt(s), {tokens} new tokens in "
        f"{seconds:.2f} s ({tokens / seconds:,.0f} tokens/s; compile {compile_s:.1f} s)",
        flush=True,
    )
    return 0


def _sampling(args: argparse.Namespace):
    from bigjax.generate import Sampling

    try:
        return Sampling(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_tokens=tuple(args.stop_token),
            seed=args.seed,
        )
    except ValueError as e:
        raise ConfigError(f"generate: {e}") from None


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Generate from a run's latest checkpoint: batched prompts, KV-cached "
        "jitted decoding, greedy (temperature 0) or sampled with top-k / top-p.",
    )
    p.add_argument("--workdir", required=True, help="the run directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--stop-token", type=int, action="append", default=[], help="token id")
    p.add_argument("--seed", type=int, default=0)
    add_debug_flag(p)
    p.set_defaults(run=cmd_generate)


def cmd_convert(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from bigjax import convert

    src, dst = Path(args.src), Path(args.dst)
    if not (src / "config.json").is_file():
        raise ConfigError(
            f"convert: {src} has no config.json; pass a Hugging Face model directory "
            "(to import) or a bigjax run directory (to export)."
        )
    if convert.is_hf_dir(src):
        raw: dict[str, Any] = {}
        for item in overrides:
            set_path(raw, *parse_override(item))
        cfg = convert.import_hf(src, dst, raw)
        m = cfg.model
        print(
            f"convert: imported {m.family} ({m.num_layers} layers, d_model {m.d_model}) from "
            f"{src} into the run directory {dst}; fine-tune with "
            f"--config.checkpoint.init_from={dst}, or run bigjax generate/eval --workdir {dst}.",
            flush=True,
        )
        return 0
    with open_run(str(src), overrides, "convert") as (prog, params, step):
        files = convert.export_hf(
            prog.cfg, params, dst, args.dtype, convert.parse_size(args.max_shard_size)
        )
    print(f"convert: exported step {step} of {src} to {dst}: {', '.join(files)}", flush=True)
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="Hugging Face <-> bigjax (Llama, GPT-2)",
        description="Converts a Hugging Face model directory (config.json + safetensors, "
        "sharded or not) into a bigjax run directory, or a bigjax run's latest checkpoint into "
        "a Hugging Face directory that transformers' from_pretrained loads. The direction "
        "follows SRC. On import, --config.* sets the new run's other settings.",
    )
    p.add_argument("src", help="a Hugging Face model directory, or a bigjax run directory")
    p.add_argument("dst", help="the directory to write (a run directory on import)")
    p.add_argument("--dtype", default="float32", help="export: float32, bfloat16 or float16")
    p.add_argument("--max-shard-size", default="5GB", help="export: shard above this size")
    add_debug_flag(p)
    p.set_defaults(run=cmd_convert)


def cmd_compress(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    with open_run(args.workdir, overrides, "compress") as (prog, params, step):
        import jax
        import numpy as np

        from bigjax import checkpoint, compress, tensorfile
        from bigjax.config import to_dict
        from bigjax.train import run_eval
        from bigjax.tree import flatten, unflatten

        flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
        before = run_eval(prog, params)
        extra: dict[str, Any] = {}
        if args.method == "quantize":
            new, stored = compress.quantize_params(flat, args.bits)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            tensorfile.write(out / "quantized.safetensors", stored, {"bits": str(args.bits)})
            extra = {
                "bits": args.bits,
                "f32_bytes": sum(v.nbytes for v in flat.values()),
                "quantized_bytes": (out / "quantized.safetensors").stat().st_size,
            }
        else:
            new = compress.prune_params(flat, args.sparsity, args.pattern)
            extra = {"pattern": args.pattern, "sparsity": compress.sparsity_report(new)}
        new_params = jax.device_put(unflatten(new), prog.shardings.params)
        after = run_eval(prog, new_params)
        report = {"method": args.method, "step": step, "before": before, "after": after, **extra}
        checkpoint.write_params_run(
            Path(args.out), to_dict(prog.cfg), unflatten(new), compressed_from=args.workdir
        )
        write_json(Path(args.out) / "compress.json", report)
    delta = after["eval_loss"] - before["eval_loss"]
    print(
        f"compress {args.method}: eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} "
        f"({delta:+.4f}), ppl {before['eval_ppl']:.3f} -> {after['eval_ppl']:.3f}",
        flush=True,
    )
    if args.method == "quantize":
        ratio = extra["f32_bytes"] / extra["quantized_bytes"]
        print(
            f"  size: {extra['f32_bytes'] / 1e6:.2f} MB float32 -> "
            f"{extra['quantized_bytes'] / 1e6:.2f} MB int{args.bits} ({ratio:.1f}x smaller)",
            flush=True,
        )
    else:
        print(f"  sparsity of the matrices: {extra['sparsity']['all matrices']:.1%}", flush=True)
    print(f"  written: {args.out} (a run directory) and {args.out}/compress.json", flush=True)
    return 0


def add_compress_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="int8/int4 weight-only quantization or magnitude pruning, with a report",
        description="Compresses a run's latest checkpoint and reports held-out loss and "
        "perplexity before and after (and size on disk, or sparsity). Writes a run directory "
        "with the compressed weights that generate, eval, convert and fine-tuning "
        "(checkpoint.init_from, with finetune.keep_sparsity for pruned models) open.",
    )
    p.add_argument("method", choices=["quantize", "prune"])
    p.add_argument("--workdir", required=True, help="the run to compress")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="quantize: 8 or 4")
    p.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.5, help="prune, unstructured: share")
    add_debug_flag(p)
    p.set_defaults(run=cmd_compress)


def cmd_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    with open_run(args.workdir, overrides, "inspect") as (prog, params, step):
        import numpy as np
        from flax import nnx

        from bigjax import interpret
        from bigjax.data import pipeline

        if prog.cfg.model.family == "vit":
            raise ConfigError("inspect: text models only (attention over a prompt's tokens).")
        tok = pipeline.tokenizer_for(prog.cfg.data)
        tokens = np.asarray([tok.bos_id, *tok.encode(args.prompt).tolist()], np.int32)
        labels = ["<bos>"] + [tok.decode([int(t)]) for t in tokens[1:]]
        model = nnx.merge(prog.graphdef, params)
        maps, lens = interpret.attention_and_lens(model, tokens)
        attr = interpret.attributions(model, tokens, steps=args.ig_steps)
        table = np.asarray(params["embed"]["table_VD"])
        rows = np.arange(min(args.embed_tokens, table.shape[0]))
        proj = interpret.projection(table, rows)
        names = [repr(tok.decode([int(r)]))[1:-1] or f"#{r}" for r in rows]
        written = interpret.write_pngs(Path(args.out), labels, maps, lens, attr, proj, names)
    print(
        f"inspect: checkpoint step {step}, prompt of {len(tokens)} tokens; predicted next "
        f"token {tok.decode([attr['target']])!r}; logit lens p(next) after the last layer "
        f"{lens[-1].mean():.3f} (embeddings {lens[0].mean():.3f})",
        flush=True,
    )
    for path in written:
        print(f"  {path}", flush=True)
    return 0


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="attention maps, logit lens, attributions, embedding projections (PNGs)",
        description="Interprets a trained text model on one prompt: attention maps of every "
        "layer and head, the logit lens, gradient x input and integrated-gradient "
        "attributions of the predicted next token, and PCA / t-SNE projections of the token "
        "embeddings, each written as a PNG.",
    )
    p.add_argument("--workdir", required=True, help="the run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated-gradient steps")
    p.add_argument("--embed-tokens", type=int, default=259, help="table rows to project")
    add_debug_flag(p)
    p.set_defaults(run=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigjax", description="A JAX research framework for scalable pretraining."
    )
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train (or resume) a run",
        description="Train, or resume the run in --workdir. Override any config key with "
        "--config.KEY=VALUE, e.g. --config.optim.lr=1e-3 --config.mesh.shape=1,-1,1.",
    )
    train.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    train.add_argument("--workdir", required=True, help="run directory (created if missing)")
    # JAX's own names. Automatic on Cloud TPU slices and SLURM; explicit elsewhere.
    train.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-host)")
    train.add_argument("--num_processes", type=int, help="processes in the job (multi-host)")
    train.add_argument("--process_id", type=int, help="this process's index (multi-host)")
    add_debug_flag(train)
    train.set_defaults(run=cmd_train)
    add_prepare_parser(sub)
    add_plan_parser(sub)
    add_bench_parser(sub)
    add_sweep_parser(sub)
    add_report_parser(sub)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_convert_parser(sub)
    add_compress_parser(sub)
    add_inspect_parser(sub)
    return parser


def quiet_library_noise() -> None:
    """Keeps what libraries print about a failure bigjax reports itself out of the console
    (`--debug` shows it): Orbax and asyncio log a failed background write with its
    traceback at ERROR before bigjax's one line names it; and tensorstore's I/O threads,
    still finishing after a failed save, call into the closed event loop, whose 'Event loop
    is closed' errors Python prints with a traceback each."""
    for name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved"
        logging.getLogger(name).setLevel(logging.CRITICAL)
    previous = sys.excepthook

    previous_unraisable = sys.unraisablehook

    def closed_loop(value: BaseException | None) -> bool:
        return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

    def hook(kind, value, tb) -> None:
        if not closed_loop(value):
            previous(kind, value, tb)

    def unraisable(info) -> None:
        if not closed_loop(info.exc_value):
            previous_unraisable(info)

    sys.excepthook = hook
    sys.unraisablehook = unraisable


def main(argv: Sequence[str] | None = None) -> int:
    argv = _join_override_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args([a for a in argv if not a.startswith("--config.")])
    overrides = [a for a in argv if a.startswith("--config.")]
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if not args.debug:
        quiet_library_noise()
    try:
        return args.run(args, overrides)
    except Exception as e:  # one line for what the user can fix; a traceback for the rest
        from bigjax.checkpoint import CheckpointError, CheckpointMismatch
        from bigjax.data.dataset import EmptySplitError
        from bigjax.data.sources import DataError
        from bigjax.data.tokenizer import TokenizerError
        from bigjax.hf import ConvertError
        from bigjax.metrics import UnknownDeviceError
        from bigjax.report import ReportError
        from bigjax.runlock import RunLockedError
        from bigjax.tensorfile import TensorFileError
        from bigjax.train import NonFiniteError

        usage = (
            ConfigError,
            DataError,
            TokenizerError,
            EmptySplitError,
            UnknownDeviceError,
            ReportError,
            ConvertError,
            TensorFileError,
            FileNotFoundError,
            RunLockedError,
            CheckpointMismatch,
        )
        if not isinstance(e, (*usage, CheckpointError, NonFiniteError)):
            raise
        if args.debug:  # the traceback too, and the same exit code
            traceback.print_exc()
        print(f"bigjax: error: {e}", file=sys.stderr)
        return USAGE_ERROR if isinstance(e, usage) else RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
