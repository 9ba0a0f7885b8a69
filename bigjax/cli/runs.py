"""Commands about runs: train, plan, bench, sweep, report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bigjax.cli.common import (
    RUN_FAILED,
    add_command,
    check_output,
    native_logs_held,
    refuse_empty,
    start_jax,
    write_json,
)
from bigjax.config import ConfigError
from bigjax.config.load import load_config


def cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """train (or resume) a run

    Train, or resume the run in --workdir. Override any config key with --config.KEY=VALUE,
    e.g. --config.optim.lr=1e-3 --config.mesh.shape=1,-1,1.
    """
    refuse_empty("train", "--workdir", args.workdir)
    cfg = load_config(args.config, overrides)
    from bigjax import distributed  # imports jax: keep `bigjax --help` and config errors fast
    from bigjax.train import train

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    start_jax(args)  # after joining the job: JAX must not start its backends before
    train(cfg, args.workdir)
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_train, config=True)
    p.add_argument("--workdir", required=True, help="run directory (created if missing)")
    # JAX's own names. Automatic on Cloud TPU slices and SLURM; explicit elsewhere.
    p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, help="processes in the job (multi-host)")
    p.add_argument("--process_id", type=int, help="this process's index (multi-host)")


def cmd_plan(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """pre-flight: memory, FLOPs and step time for a TPU slice or GPU cluster

    Parameters, FLOPs, per-device memory and step time for a config on a target, without
    the target. With libtpu installed (pip install 'bigjax[tpu]') the train step is
    compiled ahead of time for the TPU topology on this machine.
    """
    from bigjax import plan

    cfg = load_config(args.config, overrides)
    check_output("plan", "--json", args.json, "file")
    if (args.topology is None) == (args.devices is None):  # --devices 0 is given, and wrong
        raise ConfigError("plan: give either --topology (e.g. v5p-128) or --devices N.")
    target = (
        plan.parse_topology(args.topology)
        if args.topology is not None
        else plan.gpu_target(args.devices, args.device_kind)
    )
    start_jax(args)
    with native_logs_held(args):  # compiling for a TPU topology starts libtpu: its logs too
        result = plan.plan(cfg, target, args.mfu, args.compile)
    print(plan.render(result))
    write_json(args.json, result)
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_plan, config=True)
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


def cmd_bench(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """time a config's train step: tokens/s, MFU, compile, data wait, host overhead

    Compiles the config's train step and times it twice: alone on a resident batch (the
    device floor) and fed by the real pipeline as train runs it. Prints medians; --json
    writes everything, --baseline compares with an earlier --json.
    """
    cfg = load_config(args.config, overrides)
    check_output("bench", "--json", args.json, "file")
    start_jax(args)
    from bigjax import bench

    base = bench.QUICK if args.quick else bench.BenchSettings()
    settings = bench.BenchSettings(
        warmup=base.warmup if args.warmup is None else args.warmup,
        steps=base.steps if args.steps is None else args.steps,
        profile=args.profile,
    )
    baseline = None
    if args.baseline:
        path = Path(args.baseline)
        if not path.is_file():
            raise ConfigError(f"--baseline: no such file {args.baseline!r} (a bench --json).")
        try:
            baseline = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"--baseline {args.baseline}: not JSON ({e}); give a file that "
                              "bench --json wrote.") from None  # fmt: skip
        if not isinstance(baseline, dict) or "tokens_per_s" not in baseline:
            raise ConfigError(f"--baseline {args.baseline}: not a bench result (no "
                              "tokens_per_s); give a file that bench --json wrote.")  # fmt: skip
    result = bench.bench(cfg, settings)
    print(bench.render(result, baseline))
    write_json(args.json, result)
    if args.json:
        print(f"  written to {args.json}")
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_bench, config=True)
    p.add_argument("--quick", action="store_true", help="1 warm-up + 5 timed steps")
    p.add_argument("--warmup", type=int, help="untimed steps before each timing (default 3)")
    p.add_argument("--steps", type=int, help="timed steps, median reported (default 10)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--baseline", help="an earlier --json to compare against (ratios)")
    p.add_argument("--profile", help="write a profiler trace of 3 device steps to this folder")


def cmd_sweep(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """run a sweep or ablation spec (experiments/NAME/sweep.py)

    Run the trials of a sweep or ablation spec as `bigjax train` processes, N at a time,
    recorded in an Optuna study. Rerun the same command to continue a stopped or killed
    sweep; add --worker on other machines to join it.
    """
    if overrides:
        raise ConfigError("sweep: put config overrides in the spec (its `overrides` field).")
    from bigjax.sweep import results, runner, spec  # imports optuna: only for this command

    sweep = spec.load(args.spec)
    directory = Path(args.dir or f"runs/sweeps/{sweep.name}")
    check_output("sweep", "--dir", str(directory), "dir")
    opts = runner.Options(
        directory=directory,
        storage=args.storage or f"sqlite:///{directory.resolve() / 'study.db'}",
        workers=args.workers,
        join_only=args.worker,
        heartbeat_s=args.heartbeat,
    )
    study = runner.run(sweep, opts)
    print(results.summary(study), flush=True)
    if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        print(f"report: bigjax report {directory}", flush=True)
    failed = results.failures(study)
    if failed:  # the sweep did not do what it was asked: say so in the exit code
        print(
            f"bigjax: error: {len(failed)} trial(s) failed:\n  " + "\n  ".join(failed),
            file=sys.stderr,
            flush=True,
        )
        return RUN_FAILED
    return 0


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_sweep)
    p.add_argument("spec", help="a Python file defining get_sweep()")
    p.add_argument("--workers", type=int, default=1, help="trials at a time on this machine")
    p.add_argument("--worker", action="store_true", help="join an existing sweep's study")
    p.add_argument("--storage", help="study database URL (default: SQLite in the sweep dir)")
    p.add_argument("--dir", help="sweep directory (default: runs/sweeps/NAME)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")


def cmd_report(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """compare runs: markdown table and plots

    Compare runs (run directories, or sweep directories holding them): final and best eval
    loss per group (mean ± std over seeds), Δ vs the baseline, tokens, FLOPs, wall time;
    loss plots; objective-vs-parameter plots for sweeps.
    """
    if overrides:
        raise ConfigError("report: takes run or sweep directories, not config overrides.")
    from bigjax import report

    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first / "report" if len(args.paths) == 1 else None)
    if out is None:
        raise ConfigError("report: with several directories, say where to write: --out DIR.")
    check_output("report", "--out", str(out), "dir")
    text, pngs = report.report(args.paths, out, baseline=args.baseline, fit=args.fit)
    print(text)
    print(f"written: {out / 'report.md'} and {len(pngs)} plots in {out}", flush=True)
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_report)
    p.add_argument("paths", nargs="+", help="run or sweep directories")
    p.add_argument("--out", help="output directory (default: PATH/report for one path)")
    p.add_argument("--baseline", default="", help="group to compare with (default: the spec's)")
    p.add_argument("--fit", default="", choices=["", "scaling"], help="scaling: fit L(C)")
