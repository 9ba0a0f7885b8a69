"""Side by side: the same Llama model trained by bigjax and its peers on this machine, in
alternating runs. See scripts/bench/README.md.

CPU (the default): d 512, 8 layers, 8 heads, d_ff 2048, vocab 32000, batch 8 x 256, f32;
bigjax, a hand-written pure-JAX step, MaxText and PyTorch (eager / compile, f32 / bf16).

    python scripts/bench/peers.py --reps 3 --out runs/bench_peers \\
        --maxtext-python /path/to/py312-venv/bin/python --torch-python /path/to/venv/bin/python

Accelerator (`--size 125m` or `--size 1b`, shapes in peers/shapes.py): bigjax's shipped
config as it tunes itself for the device, the same with scanned layers, a plain-JAX step
with cuDNN attention (peers/plain_jax_gpu.py) and Hugging Face Llama with torch.compile
(peers/hf_llama.py); MFU of every peer by bigjax's FLOP count against the device's peak.

    python scripts/bench/peers.py --size 1b --reps 3 --steps 10 --warmup 3 \\
        --torch-python python3 --out runs/bench_peers_1b

Each run is a fresh process that warms up, times --steps steps and reports their median; a rep
runs every peer once, in an order rotated each rep, so slow drift of the machine (thermal,
other load) spreads over all peers. The table gives the median over reps and ratios to bigjax.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from shapes import SHAPES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "scripts" / "bench" / "peers"
TOKENS_PER_STEP = 8 * 256
# lm_small is this model with the byte vocabulary; the peers use 32000.
BIGJAX_ARGS = ["--config", "configs/lm_small.py", "--config.model.vocab_size=32000"]


def bigjax_args(args) -> list[str]:
    if not args.size:
        return BIGJAX_ARGS
    s = SHAPES[args.size]
    return ["--config", s["config"], f"--config.data.batch_size={s['batch']}",
            f"--config.data.seq_len={s['seq']}", "--config.checkpoint.every_steps=0"]  # fmt: skip


def bigjax_run(args, tmp: Path, extra: tuple[str, ...] = ()) -> dict:
    out = tmp / "bigjax.json"
    cmd = [sys.executable, "-m", "bigjax.cli", "bench", *bigjax_args(args), *extra]
    cmd += args.bigjax_extra
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--json", str(out)]
    _run(cmd)
    r = json.loads(out.read_text())
    return {
        "step_times_s": r["loop_step_times_s"],
        "device_step_times_s": r["device_step_times_s"],
        "compile_s": r["compile_s"],
        "flops_per_step": r["flops_per_step"],
        "peak_flops": r["peak_flops"],
        "choices": r.get("choices"),
    }


def script_run(python: str, script: str, *flags: str):
    def run(args, tmp: Path) -> dict:
        cmd = [python, str(PEERS_DIR / script), "--steps", str(args.steps)]
        out = _run([*cmd, "--warmup", str(args.warmup), *flags])
        return json.loads([x for x in out.splitlines() if x.startswith('{"peer"')][-1])

    return run


def maxtext_run(args, tmp: Path) -> dict:
    """MaxText's own trainer on synthetic data; step times parsed from its log."""
    run_dir = tmp / "maxtext"
    cmd = [
        args.maxtext_python,
        "-m",
        "maxtext.trainers.pre_train.train",
        args.maxtext_config,
        f"run_name=peers_{int(time.time())}",
        f"base_output_directory={run_dir}",
        "hardware=cpu",
        "skip_jax_distributed_system=true",
        "dataset_type=synthetic",
        f"dump_hlo_local_dir={run_dir / 'hlo'}",
        f"jax_cache_dir={run_dir / 'jax_cache'}",
        "enable_checkpointing=false",
        f"steps={args.warmup + args.steps + 2}",
        "per_device_batch_size=8",
        "max_target_length=256",
        "base_emb_dim=512",
        "base_num_decoder_layers=8",
        "base_num_query_heads=8",
        "base_num_kv_heads=8",
        "head_dim=64",
        "base_mlp_dim=2048",
        "vocab_size=32000",
        "dtype=float32",
        "weight_dtype=float32",
        "decoder_block=llama2",
        "scan_layers=true",
        f"remat_policy={args.maxtext_remat}",
        "enable_tensorboard=false",
        "log_period=1000000",
        *args.maxtext_extra,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = _run(cmd, env=env)
    # MaxText's own "seconds:" figure is the time between host-side loop iterations with
    # asynchronous dispatch and a one-step metric lag, so single values swing (0.03 s, 7.4 s).
    # The spacing of its "completed step" log lines is the steady-state step time.
    stamps = [
        _seconds_of_day(m.group(1))
        for m in re.finditer(r"I\d{4} (\d\d:\d\d:\d\d\.\d+) .*completed step: \d+", out)
    ]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if len(gaps) < args.steps:
        raise RuntimeError(f"MaxText logged {len(stamps)} steps:\n{out[-3000:]}")
    return {"step_times_s": gaps[-args.steps :], "compile_s": float("nan")}


def _seconds_of_day(hms: str) -> float:
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _run(cmd: list[str], env: dict | None = None) -> str:
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env=env or {**os.environ}, timeout=1800
    )
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def machine(args) -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else cpu
    mem = ""
    if Path("/proc/meminfo").exists():
        kib = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kib / 2**20:.0f} GiB"
    versions = {}
    for name, python, code in (
        ("jax (bigjax, pure-jax)", sys.executable, "import jax; print(jax.__version__)"),
        ("jax (MaxText)", args.maxtext_python, "import jax; print(jax.__version__)"),
        (
            "maxtext",
            args.maxtext_python,
            "import importlib.metadata as m; print(m.version('maxtext'))",
        ),
        ("torch", args.torch_python, "import torch; print(torch.__version__)"),
    ):
        if python:
            r = subprocess.run([python, "-c", code], capture_output=True, text=True)
            versions[name] = r.stdout.strip() or "unavailable"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def cpu_peers(args) -> dict:
    peers = {
        "bigjax": bigjax_run,
        "pure-jax": script_run(sys.executable, "pure_jax.py"),
    }
    if args.maxtext_python:
        if not args.maxtext_config:
            args.maxtext_config = _maxtext_base_config(args.maxtext_python)
        peers["MaxText"] = maxtext_run
    if args.torch_python:
        for compiled in (False, True):
            for bf16 in (False, True):
                flags = [f for f, on in (("--compile", compiled), ("--bf16", bf16)) if on]
                name = f"torch {'compile' if compiled else 'eager'} {'bf16' if bf16 else 'f32'}"
                peers[name] = script_run(args.torch_python, "torch_llama.py", *flags)
    return peers


def accelerator_peers(args) -> dict:
    """bigjax as shipped (its `platforms` entry for this device), bigjax with scanned layers
    (scan must cost nothing), the plain-JAX floor and Hugging Face + torch.compile."""
    size = ("--size", args.size)
    attention = "cudnn" if _has_gpu() else "xla"
    peers = {
        "bigjax": bigjax_run,
        "bigjax scanned": lambda a, tmp: bigjax_run(a, tmp, ("--config.model.scan_layers=true",)),
        "plain-jax": script_run(
            sys.executable, "plain_jax_gpu.py", *size, "--attention", attention
        ),
    }
    if args.torch_python:
        peers["hf torch.compile"] = script_run(args.torch_python, "hf_llama.py", *size)
    return peers


def _has_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_peers")
    parser.add_argument("--maxtext-python", help="python of a Python 3.12 venv with maxtext")
    parser.add_argument("--maxtext-config", default="", help="MaxText base.yml (default: its own)")
    # MaxText always wraps layers in jax.checkpoint; this policy saves the most (its fastest).
    parser.add_argument("--maxtext-remat", default="minimal_with_context")
    parser.add_argument("--maxtext-extra", nargs="*", default=[], help="more key=value")
    parser.add_argument("--torch-python", help="python of a venv with torch")
    parser.add_argument("--bigjax-extra", nargs="*", default=[], help="--config.* overrides")
    parser.add_argument("--only", nargs="*", help="peer names to run (default: all available)")
    parser.add_argument("--size", choices=sorted(SHAPES), help="accelerator peers at this shape")
    args = parser.parse_args()
    peers = accelerator_peers(args) if args.size else cpu_peers(args)
    if args.only:
        peers = {k: v for k, v in peers.items() if k in args.only}
    tokens_per_step = (
        SHAPES[args.size]["batch"] * SHAPES[args.size]["seq"] if args.size else (TOKENS_PER_STEP)
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in peers}
    names = list(peers)
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            with tempfile.TemporaryDirectory() as tmp:
                r = peers[name](args, Path(tmp))
            r["median_step_s"] = statistics.median(r["step_times_s"])
            runs[name].append(r)
            print(
                f"rep {rep + 1}/{args.reps} {name:<20} {r['median_step_s']:.4f} s/step", flush=True
            )

    summary = {}
    for name, rs in runs.items():
        step = statistics.median(r["median_step_s"] for r in rs)
        summary[name] = {
            "step_s": step,
            "tokens_per_s": tokens_per_step / step,
            "rep_medians_s": [r["median_step_s"] for r in rs],
            "compile_s": statistics.median(r["compile_s"] for r in rs),  # nan: MaxText
        }
    base = summary["bigjax"]["tokens_per_s"] if "bigjax" in summary else None
    bj = runs.get("bigjax", [{}])[0]
    if "flops_per_step" in bj:  # MFU of every peer by bigjax's FLOP count and peak
        for s in summary.values():
            s["mfu"] = bj["flops_per_step"] / s["step_s"] / bj["peak_flops"]
    result = {"machine": machine(args), "args": vars(args), "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| peer | step (median) | tokens/s | MFU | bigjax ÷ peer | per-rep medians (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in sorted(summary.items(), key=lambda kv: kv[1]["step_s"]):
        ratio = f"{base / s['tokens_per_s']:.2f}×" if base else "-"
        reps = ", ".join(f"{x:.3f}" for x in s["rep_medians_s"])
        mfu = f"{s['mfu']:.1%}" if "mfu" in s else "-"
        lines.append(
            f"| {name} | {s['step_s']:.3f} s | {s['tokens_per_s']:,.0f} | {mfu} | {ratio} "
            f"| {reps} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(json.dumps(result["machine"], indent=2))
    print(table)


def _maxtext_base_config(python: str) -> str:
    code = "import maxtext, os; print(os.path.dirname(maxtext.__file__))"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return str(Path(r.stdout.strip()) / "configs" / "base.yml")


if __name__ == "__main__":
    main()
