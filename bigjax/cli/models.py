"""Commands on a trained model: eval, generate, convert, compress, inspect."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bigjax.cli.common import (
    add_command,
    add_run_argument,
    check_output,
    needs,
    run_dir,
    start_jax,
    utf8_text,
    write_json,
)
from bigjax.config import ConfigError
from bigjax.config.load import parse_override, set_path
from bigjax.trained import check_outside, open_run


def cmd_eval(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """held-out loss, multiple choice, and lm-evaluation-harness benchmarks of a run

    Evaluate a run's latest checkpoint: loss and perplexity on the held-out split
    (eval.num_batches batches; override with --config.eval.num_batches=N) and, with
    --choices, multiple-choice accuracy by log-likelihood; or, with --tasks, lm-evaluation-
    harness tasks (hellaswag, arc_easy, ... or your own YAML under --include-path) scored
    in process.
    """
    workdir = run_dir(args, "eval")
    check_output("eval", "--json", args.json, "file")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:  # lm-eval's own error: a traceback from inside it
        raise ConfigError(f"eval: --tasks {args.tasks!r} names no task; give lm-eval task names, "
                          "comma-separated (e.g. arc_easy,hellaswag).")  # fmt: skip
    if args.tasks:
        needs("lm_eval", "harness", "eval --tasks")
    elif args.include_path or args.limit is not None or args.num_fewshot is not None:
        raise ConfigError("eval: --include-path, --limit and --num-fewshot go with --tasks.")
    limit = args.limit
    # NaN too; lm-eval cuts a count to an int (2.5 read as 2) and cannot take an infinite one
    if limit is not None and not (0 < limit < 1 or (1 <= limit < math.inf and limit.is_integer())):
        raise ConfigError(f"eval: --limit {args.limit}: give a count of documents per task "
                          "(>= 1) or a fraction of them (between 0 and 1).")  # fmt: skip
    if limit is not None and limit > 2**62:
        raise ConfigError(f"eval: --limit {args.limit} is more documents than any task holds; "
                          "leave it out to score every document.")  # fmt: skip
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"eval: --num-fewshot {args.num_fewshot}: give 0 or more examples.")
    start_jax(args)
    if args.tasks:
        from bigjax import evals
        from bigjax.evaluate import harness_run

        results = harness_run(workdir, overrides, tasks, include_path=args.include_path,
                              limit=args.limit, num_fewshot=args.num_fewshot)  # fmt: skip
        print(evals.table(results))
        write_json(args.json, results)
        return 0
    from bigjax.evaluate import evaluate_run

    result = evaluate_run(workdir, overrides, args.choices)
    for key, value in result.items():
        print(f"  {key:18s} {value:.4f}" if isinstance(value, float) else f"  {key:18s} {value}")
    write_json(args.json, result)
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_eval)
    add_run_argument(p)
    p.add_argument(
        "--choices",
        help="multiple choice: 'stdlib' (built-in next-line task) or a JSON-lines file of "
        "{context, choices: [...], answer: index} (default: the run's eval.choices)",
    )
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy)")
    p.add_argument("--include-path", default="", help="a directory of lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="lm-eval: at most this many documents per task "
                   "(a fraction if < 1)")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples per prompt")
    p.add_argument("--json", help="also write the results here")


def cmd_generate(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """sample text from a trained run

    Generate from a run's latest checkpoint: batched prompts, KV-cached jitted decoding,
    greedy (temperature 0) or sampled with top-k / top-p.
    """
    workdir = run_dir(args, "generate")
    start_jax(args)
    from bigjax.generate import generate_from_run

    texts, s = generate_from_run(workdir, overrides, args.prompt, _sampling(args))
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"--- {prompt!r}\n{prompt}{text}", flush=True)
    print(
        f"generate: checkpoint step {s['step']}, {len(texts)} prompt(s), {s['tokens']} new "
        f"tokens in {s['seconds']:.2f} s ({s['tokens'] / s['seconds']:,.0f} tokens/s; "
        f"compile {s['compile']:.1f} s)",
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
    p = add_command(sub, cmd_generate)
    add_run_argument(p)
    p.add_argument(
        "--prompt", action="append", required=True, type=utf8_text, help="repeat for a batch"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--stop-token", type=int, action="append", default=[], help="token id")
    p.add_argument("--seed", type=int, default=0)


def cmd_convert(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Hugging Face <-> bigjax (Llama, Mixtral, GPT-2)

    Converts a Hugging Face model directory (config.json + safetensors, sharded or not)
    into a bigjax run directory, or a bigjax run's latest checkpoint into a Hugging Face
    directory that transformers' from_pretrained loads. The direction follows SRC. On
    import, --config.* sets the new run's other settings.
    """
    check_output("convert", "DST", args.dst, "dir")
    start_jax(args)
    from bigjax import convert

    src, dst = Path(args.src), Path(args.dst)
    if not (src / "config.json").is_file():
        raise ConfigError(
            f"convert: {src} has no config.json; pass a Hugging Face model directory "
            "(to import) or a bigjax run directory (to export)."
        )
    if convert.is_hf_dir(src):
        if args.with_tokenizer:
            raise ConfigError(
                f"convert: --with-tokenizer is for an export; {src} is a Hugging Face model "
                f"(an import). Prepare data with its tokenizer: bigjax prepare --tokenizer "
                f"hf:{src}."
            )
        raw: dict[str, Any] = {}
        for item in overrides:
            set_path(raw, *parse_override(item))
        cfg = convert.import_hf(src, dst, raw)
        m = cfg.model
        print(
            f"convert: imported {m.family} ({m.num_layers} layers, d_model {m.d_model}) from "
            f"{src} into the run directory {dst}; fine-tune with "
            f"--config.checkpoint.init_from={dst}, or run bigjax generate/eval {dst}.",
            flush=True,
        )
        return 0
    with open_run(str(src), overrides, "convert") as (prog, params, step):
        tokenizer = prog.resources.tokenizer if args.with_tokenizer else None
        files = convert.export_hf(
            prog.cfg, params, dst, args.dtype, convert.parse_size(args.max_shard_size),
            tokenizer, src,
        )  # fmt: skip
    print(f"convert: exported step {step} of {src} to {dst}: {', '.join(files)}", flush=True)
    if tokenizer is None:
        print("convert: no tokenizer written; add --with-tokenizer to write the run's own "
              "(tokenizer.json, for AutoTokenizer).", flush=True)  # fmt: skip
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_convert)
    p.add_argument("src", help="a Hugging Face model directory, or a bigjax run directory")
    p.add_argument("dst", help="the directory to write (a run directory on import)")
    p.add_argument("--dtype", default="float32", help="export: float32, bfloat16 or float16")
    p.add_argument("--max-shard-size", default="5GB", help="export: shard above this size")
    p.add_argument("--with-tokenizer", action="store_true",
                   help="export: write the run's tokenizer too (tokenizer.json and "
                        "tokenizer_config.json, for AutoTokenizer)")  # fmt: skip


def cmd_compress(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """int8/int4 weight-only quantization or magnitude pruning, with a report

    Compresses a run's latest checkpoint and reports held-out loss and perplexity before
    and after (and size on disk, or sparsity). Writes a run directory with the compressed
    weights that generate, eval, convert and fine-tuning (checkpoint.init_from, with
    finetune.keep_sparsity for pruned models) open.
    """
    workdir = run_dir(args, "compress")
    if not Path(args.out).is_file():  # a file: compress's own message, naming a new run
        check_outside(workdir, args.out, "compress")  # its message first: the run is named
        check_output("compress", "--out", args.out, "dir")
    given = {"--bits": args.bits, "--pattern": args.pattern, "--sparsity": args.sparsity}
    other = {"quantize": "prune", "prune": "quantize"}[args.method]
    if stray := [f for f in FLAGS_OF[other] if given[f] is not None]:  # else silently unused
        raise ConfigError(f"compress {args.method}: {' and '.join(stray)} go(es) with "
                          f"`compress {other}`; drop it.")  # fmt: skip
    if args.pattern == "2:4" and args.sparsity not in (None, 0.5):
        raise ConfigError(f"compress prune: --pattern 2:4 keeps 2 weights of every 4 (sparsity "
                          f"0.5), not --sparsity {args.sparsity}; drop --sparsity.")  # fmt: skip
    start_jax(args)
    from bigjax.compress import compress_run

    report = compress_run(
        workdir, overrides, args.method, args.out, args.bits or 8,
        0.5 if args.sparsity is None else args.sparsity, args.pattern or "unstructured",
    )  # fmt: skip
    before, after, extra = report["before"], report["after"], report
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
            f"{extra['quantized_bytes'] / 1e6:.2f} MB int{extra['bits']} ({ratio:.1f}x smaller)",
            flush=True,
        )
    else:
        print(f"  sparsity of the matrices: {extra['sparsity']['all matrices']:.1%}", flush=True)
    print(f"  written: {args.out} (a run directory) and {args.out}/compress.json", flush=True)
    return 0


def add_compress_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_compress)
    p.add_argument("method", choices=["quantize", "prune"])
    add_run_argument(p)
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--bits", type=int, choices=[8, 4], help="quantize: 8 (default) or 4")
    p.add_argument(
        "--pattern", choices=["unstructured", "2:4"], help="prune (default: unstructured)"
    )
    p.add_argument("--sparsity", type=float, help="prune, unstructured: share (default 0.5)")


FLAGS_OF = {"quantize": ("--bits",), "prune": ("--pattern", "--sparsity")}


def cmd_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """attention maps, logit lens, attributions, embedding projections (PNGs)

    Interprets a trained text model on one prompt: attention maps of every layer and head,
    the logit lens, gradient x input and integrated-gradient attributions of the predicted
    next token, and PCA / t-SNE projections of the token embeddings, each written as a PNG.
    """
    workdir = run_dir(args, "inspect")
    check_output("inspect", "--out", args.out, "dir")
    start_jax(args)
    from bigjax.interpret import inspect_run

    s, written = inspect_run(
        workdir, overrides, args.prompt, args.out, args.ig_steps, args.embed_tokens
    )
    print(
        f"inspect: checkpoint step {s['step']}, prompt of {s['tokens']} tokens; predicted next "
        f"token {s['next_token']!r}; logit lens p(next) after the last layer "
        f"{s['lens_last']:.3f} (embeddings {s['lens_first']:.3f})",
        flush=True,
    )
    for path in written:
        print(f"  {path}", flush=True)
    return 0


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_inspect)
    add_run_argument(p)
    p.add_argument("--prompt", required=True, type=utf8_text)
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated-gradient steps")
    p.add_argument("--embed-tokens", type=int, default=259, help="table rows to project")
