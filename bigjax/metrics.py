"""Metric writers (console, JSONL, TensorBoard), throughput, MFU and the loss-curve plot."""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp

from bigjax.config import ConfigError
from bigjax.errors import RunFailed, UsageError

# Dense bf16 peak FLOP/s per device from vendor datasheets. Longest matching key wins, so
# "TPU v5 lite" (v5e) is not taken for "TPU v5" (v5p).
DATASHEET_PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}

# Dense fp8 peak FLOP/s where the device has fp8 matrix units (2x its bf16 rate); devices not
# listed run fp8 matmuls no faster than bf16 (`plan` says so). MFU stays against the bf16
# peak in every run, fp8 or not (as torchtitan reports it): fp8's gain shows as higher MFU.
DATASHEET_FP8_PEAK_FLOPS: dict[str, float] = {"H100": 1979e12, "H200": 1979e12}

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.figure import Figure

# A logged row: step, metric values (None where not measured yet, e.g. MFU at compilation).
Row = Mapping[str, float | None]


def finite_json(x: Any) -> Any:
    """`x` with every NaN or infinity replaced by None: strict JSON has no such numbers, and
    Python's `NaN` tokens break other readers (jq, JavaScript, pandas' strict mode)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def json_text(x: Any, **kwargs: Any) -> str:
    """Strict JSON of `x` (non-finite numbers as null); what every file bigjax writes uses."""
    return json.dumps(finite_json(x), allow_nan=False, **kwargs)


class UnknownDeviceError(UsageError, ValueError):
    """No peak FLOP/s is known for this device kind."""


def datasheet_peak(device_kind: str) -> float:
    matches = [k for k in DATASHEET_PEAK_FLOPS if k.lower() in device_kind.lower()]
    if not matches:
        raise UnknownDeviceError(
            f"unknown device kind {device_kind!r}: no datasheet peak FLOP/s for MFU. Set "
            f"metrics.peak_flops=<per-device FLOP/s>. Known: {', '.join(DATASHEET_PEAK_FLOPS)}."
        )
    return DATASHEET_PEAK_FLOPS[max(matches, key=len)]


@functools.cache  # the host does not change under a process: measure once, not per run
def measure_cpu_peak(device: jax.Device, n: int = 0, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of a large jitted f32 matmul: the attainable CPU peak. The matmul
    (n x n) must keep every core busy: n = 1024 does on a few cores (2 GFLOP, ~10 ms on two:
    the same rate as 2048 within noise, measured 289 vs 280 GFLOP/s, for an eighth of the
    ~0.5 s), 2048 beyond 8 cores."""
    n = n or (1024 if (os.cpu_count() or 1) <= 8 else 2048)
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def total_peak_flops(devices: Sequence[jax.Device], per_device: float = 0.0) -> float:
    """Peak FLOP/s of all `devices` together.

    On CPU, fake devices (--xla_force_host_platform_device_count) share the same cores, so
    the peak is the host's measured matmul rate, not a multiple of it.
    """
    if per_device > 0:
        return per_device * len(devices)
    if devices[0].platform == "cpu":
        return measure_cpu_peak(devices[0])
    return datasheet_peak(devices[0].device_kind) * len(devices)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(row: Row, num_steps: int, width: int = 20) -> str:
    done = (row["step"] or 0) / num_steps
    bar = "#" * int(done * width) + "-" * (width - int(done * width))
    head = f"step {row['step']:>{len(str(num_steps))}}/{num_steps} [{bar}] {done:4.0%} | "
    head += f"loss {row['loss']:.4f}"
    if row.get("dp_epsilon") is not None:  # DP-SGD: the privacy spent so far, and the noise
        head += f" | ε {row['dp_epsilon']:.3g} (σ {row['dp_noise_multiplier']:.3g})"
    if row.get("step_time") is None:  # the first step of a process: compilation
        return head + f" | compiled in {row.get('compile_s', 0.0):.1f} s"
    mfu = "-" if row.get("mfu") is None else f"{row['mfu']:.1%}"  # null: the peak is doubted
    return head + (
        f" | {row['tokens_per_sec']:,.0f} tok/s | mfu {mfu} | "
        f"{row['step_time']:.3f} s/step | eta {format_duration(row['eta_s'] or 0.0)}"
    )


class WriteError(RunFailed, RuntimeError):
    """A run file could not be written (the run directory became read-only, a full disk, a
    read-only remount); the message names the file and the way on."""


def unwritable(path: Path, e: OSError) -> WriteError:
    return WriteError(
        f"cannot write {path} ({e.strerror or e}): the run directory is no longer writable "
        "(permissions, a full disk, a read-only remount). Fix that and rerun the same command: "
        "it resumes from the last checkpoint."
    )


class Writers:
    """Console, `metrics.jsonl`, TensorBoard and Weights & Biases. Only the writing process
    creates files."""

    def __init__(
        self,
        workdir: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        wandb_project: str = "",
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if enabled and tensorboard:
            self._tb = _summary_writer()(str(workdir / "tensorboard"))
        if enabled and wandb_project:
            self._wandb = _wandb_run(workdir, wandb_project, config or {})

    def truncate_after(self, step: int) -> None:
        """On resume, drops rows logged after the checkpoint, so each step appears once. A
        damaged row is dropped too, and said: a kill cuts only the last line."""
        if not self.enabled or not self.path.exists():
            return
        lines, rows, damaged = _parsed(self.path.read_bytes())
        if damaged:
            print(f"warning: {self.path}: line(s) {', '.join(map(str, damaged[:10]))} damaged "
                  "(not a JSON row with a step); dropped.", flush=True)  # fmt: skip
        # rewritten beside and renamed over: a kill here leaves the old file or the new one
        tmp = self.path.with_suffix(".tmp")
        kept = (
            line
            for line, row in zip(lines, rows, strict=True)
            if row is not None and row["step"] <= step
        )
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        tmp.replace(self.path)

    def write(self, row: Row, console: str | None = None) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json_text(row) + "\n")
        except OSError as e:
            raise unwritable(self.path, e) from e
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))})
        if console:
            print(console, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(workdir: Path, project: str, config: dict[str, Any]) -> Any:
    """A W&B run for this workdir: named after it, with its config, and the same W&B run on
    every resume (its id kept in wandb/run_id). Entity, mode (`WANDB_MODE=offline`) and key
    come from W&B's own environment variables. Charts use bigjax's `step` as their x axis:
    a resume that retrains steps logs them again rather than being refused by W&B's own
    step counter."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "metrics.wandb_project needs Weights & Biases: pip install 'bigjax[wandb]'."
        ) from None
    id_file = workdir / "wandb" / "run_id"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(6), encoding="utf-8")  # W&B ids: letters and digits
    try:
        run = wandb.init(
            project=project,
            name=workdir.resolve().name,
            id=id_file.read_text(encoding="utf-8").strip(),
            resume="allow",
            dir=str(workdir),
            config=config,
            settings=wandb.Settings(silent=True, console="off"),  # bigjax prints its own lines
        )
    except Exception as e:  # not logged in, no network, a bad project name: say so, briefly
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"metrics.wandb_project: W&B could not start ({first}). Log in with `wandb login`, "
            "or log offline with WANDB_MODE=offline (then `wandb sync`)."
        ) from e
    run.define_metric("*", step_metric="step")
    return run


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a line cut short by a kill (or still being written while
    a sweep reads it), or damaged on disk (not UTF-8, not a JSON object, no integer step: every
    row bigjax writes has one), is skipped."""
    return read_jsonl_checked(path)[0]


def read_jsonl_checked(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """`read_jsonl`'s rows, and the numbers (from 1) of the lines it skipped as damaged."""
    _, rows, damaged = _parsed(path.read_bytes())
    return [row for row in rows if row is not None], damaged


def _parsed(data: bytes) -> tuple[list[bytes], list[dict[str, Any] | None], list[int]]:
    """A metrics file's lines, each one's row (None: not a row bigjax writes), and the numbers
    (from 1) of the damaged ones: not the blank ones, nor a last line without its newline (a
    kill cut it, or it is being written)."""
    lines = data.splitlines()
    rows = [_row_of(line) for line in lines]
    cut = len(lines) if not data.endswith(b"\n") else 0
    damaged = [
        n for n, row in enumerate(rows, 1) if row is None and n != cut and lines[n - 1].strip()
    ]
    return lines, rows, damaged


def _row_of(line: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(line)  # bytes: UTF-8 decoded by json; a bad byte is a ValueError
    except ValueError:
        return None
    ok = isinstance(row, dict) and type(row.get("step")) is int and row["step"] >= 0
    return row if ok else None


def metric_value(value: object) -> float | None:
    """A metric as `json_text` wrote it: a number, or null for a non-finite one (NaN here: a
    diverged eval reads as nan, not as missing); None for anything else (damaged)."""
    if value is None:
        return math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def curve(rows: Sequence[Mapping[str, object]], key: str) -> list[tuple[int, float]]:
    """(step, value) of the `read_jsonl` rows that hold `key` (each has an int step); a
    damaged value is skipped."""
    points = ((cast(int, r["step"]), metric_value(r[key])) for r in rows if key in r)
    return [(step, v) for step, v in points if v is not None]


def last_logged(path: Path, key: str, at_most: int) -> tuple[int, Any] | None:
    """(step, value) of the newest row of a metrics file at or before step `at_most` that
    holds `key`; None if there is none (or no file)."""
    rows = read_jsonl(path) if path.is_file() else []
    found = [(int(r["step"]), r[key]) for r in rows if key in r and int(r["step"]) <= at_most]
    return max(found, key=lambda x: x[0]) if found else None


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with its start-up bias removed (as TensorBoard's slider):
    early points are not dragged towards 0."""
    out, ema = [], 0.0
    for i, v in enumerate(values, start=1):
        ema = weight * ema + (1 - weight) * v
        out.append(ema / (1 - weight**i))
    return out


def plot_loss(metrics_path: Path, png_path: Path, title: str = "", log_scale: bool = True) -> None:
    """loss.png of a run: see `loss_figure`; titled with the run directory's name."""
    import matplotlib.pyplot as plt

    fig = loss_figure(
        read_jsonl(metrics_path), title or metrics_path.parent.resolve().name, log_scale
    )
    fig.savefig(png_path)
    plt.close(fig)


def loss_figure(rows: Sequence[Row], title: str, log_scale: bool = True) -> Figure:
    """Training loss (raw, faint, and smoothed) and eval loss against step. On a log axis the
    first steps' drop from ~ln(vocab) no longer flattens the rest of the run."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    # a non-finite loss (null in the file) is a gap: it has no place on the axis
    train, evals = (
        [p for p in curve(rows, k) if math.isfinite(p[1])] for k in ("loss", "eval_loss")
    )
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        steps, losses = zip(*train, strict=True)
        line = ax.plot(steps, losses, alpha=0.25, linewidth=0.8)[0]
        # ~20 logged points of memory, whatever log_every and the run's length
        weight = 1 - 1 / min(20, max(len(losses) / 10, 1))
        ax.plot(steps, smoothed(losses, weight), color=line.get_color(), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    if log_scale:
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 5, not 5x10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)" + (", log scale" if log_scale else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def _summary_writer() -> Any:
    """tensorboardX's SummaryWriter, imported only where it is used. Its module imports torch
    whenever torch is installed, only to accept torch tensors (bigjax logs floats): ~1 s and
    ~200 MB a process. `import torch` is made to fail while the module loads, unless torch is
    already loaded."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    finally:
        del sys.modules["torch"]
