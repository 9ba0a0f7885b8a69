"""`bigjax bench`: how fast a config's train step runs here, and where the time goes.

Two timings of one compiled step (compiled once, timed separately):
  - device: the step alone on one batch already on the devices, each step waited for. This is
    the floor: nothing but the compiled program.
  - loop: the step as `train` runs it: next batch from the real Grain pipeline, assembled into
    a global array, step dispatched, the previous step's metrics fetched (one step of lag, so
    the host prepares step n+1 while the devices run step n).
The loop's median step time gives tokens/s and MFU; loop minus device is the host overhead per
step (data, dispatch, metric fetch not hidden behind device work), and the time spent in
`next(batch)` is reported on its own. Medians, so one slow step (GC, a page fault) does not
move the result.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Any

import jax

from bigjax import metrics, models, stages
from bigjax.config import ConfigError, TrainConfig
from bigjax.layers import compute_dtype
from bigjax.mesh import for_run
from bigjax.program import for_config
from bigjax.sharding import num_stages


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    warmup: int = 3  # untimed steps before each timing (caches, allocator, prefetch buffers)
    steps: int = 10  # timed steps per timing; the median is reported
    # Where to write a profiler trace of 3 device steps after the timings (TensorBoard /
    # XProf reads it); None: no trace. After, not during: tracing slows the steps it records.
    profile: str | None = None


QUICK = BenchSettings(warmup=1, steps=5)
PROFILED_STEPS = 3


def bench(cfg: TrainConfig, settings: BenchSettings = BenchSettings()) -> dict[str, Any]:
    """Compiles `cfg`'s train step and times it; returns the figures as a JSON-able dict."""
    if settings.steps < 1 or settings.warmup < 0:
        raise ConfigError(f"bench: --steps {settings.steps} --warmup {settings.warmup}: time at "
                          "least 1 step, after 0 or more warm-up steps.")  # fmt: skip
    cfg, mesh = for_run(cfg)
    peak = metrics.total_peak_flops(jax.devices(), cfg.metrics.peak_flops)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        state = prog.init()
        data = prog.batches("train", cfg.data_seed)
        try:
            resident = prog.to_global(next(data))
            start = time.perf_counter()
            step = prog.train_step.lower(state, resident).compile()
            compile_s = time.perf_counter() - start

            device_s = []
            for i in range(settings.warmup + settings.steps):
                start = time.perf_counter()
                state, out = step(state, resident)
                jax.block_until_ready((state, out))
                if i >= settings.warmup:
                    device_s.append(time.perf_counter() - start)
            if settings.profile:
                with jax.profiler.trace(settings.profile):
                    for _ in range(PROFILED_STEPS):
                        state, out = step(state, resident)
                    jax.block_until_ready((state, out))

            # At least one untimed iteration, so that every timed one waits for a step.
            loop_warmup = max(settings.warmup, 1)
            loop_s, wait_s, pending = [], [], None
            for i in range(loop_warmup + settings.steps):
                start = time.perf_counter()
                local = next(data)
                got_batch = time.perf_counter()
                state, out = step(state, prog.to_global(local))
                if pending is not None:
                    jax.device_get(pending)  # train reads metrics one step late, like this
                pending = out
                if i >= loop_warmup:
                    loop_s.append(time.perf_counter() - start)
                    wait_s.append(got_batch - start)
            last = jax.device_get(pending)
        finally:
            data.close()

    step_s = statistics.median(loop_s)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    flops = models.FLOPS_PER_TOKEN[cfg.model.family](cfg.model, cfg.data.seq_len) * tokens
    return {
        "machine": machine(),
        "model": {
            "size": cfg.model.size,
            "params": models.count_params(prog.graph_state),
            "d_model": cfg.model.d_model,
            "num_layers": cfg.model.num_layers,
            "vocab_size": cfg.model.vocab_size,
            "compute_dtype": compute_dtype(cfg.model.dtype).name,
            "param_dtype": cfg.model.param_dtype,
        },
        "batch": [cfg.data.batch_size, cfg.data.seq_len],
        "choices": choices(cfg, prog),
        "mesh": dict(mesh.shape),
        "pipeline": stages.schedule(
            num_stages(cfg.mesh.rules, mesh.shape, cfg.model.num_layers),
            cfg.model.pipeline_microbatches,
            cfg.model.pipeline_interleave,
        ),
        "settings": dataclasses.asdict(settings),
        "compile_s": compile_s,
        "step_time_s": step_s,
        "device_step_s": statistics.median(device_s),
        # Not below 0: a loop step can time under a device step, whose every step is waited
        # for (the loop overlaps dispatch with the device); that is noise, not negative work.
        "host_overhead_s": max(0.0, step_s - statistics.median(device_s)),
        "data_wait_s": statistics.median(wait_s),
        "tokens_per_s": tokens / step_s,
        "mfu": flops / step_s / peak,
        "peak_flops": peak,
        "flops_per_step": flops,
        # The last timed step's loss: a kernel that runs fast on wrong numbers shows here (the
        # timings of a NaN step are not a result).
        "loss": float(last["loss"]),
        "loop_step_times_s": loop_s,
        "device_step_times_s": device_s,
    }


def choices(cfg: TrainConfig, prog: Any) -> dict[str, Any]:
    """The speed-relevant settings this run took, and which `platforms` entry chose them."""
    return {
        "platforms_entry": cfg.platform or "(none)",
        "attention": prog.attention,
        "remat": cfg.model.remat,
        "scan_layers": cfg.model.scan_layers,
        "micro_batches": cfg.optim.grad_accum_steps,
        "compute_dtype": compute_dtype(cfg.model.dtype).name,
    }


def machine() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "platform": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


ROWS = (
    ("tokens/s", "tokens_per_s", "{:,.0f}", True),
    ("MFU", "mfu", "{:.1%}", True),
    ("step time (loop)", "step_time_s", "{:.4f} s", False),
    ("step time (device)", "device_step_s", "{:.4f} s", False),
    ("host overhead / step", "host_overhead_s", "{:.4f} s", False),
    ("data wait / step", "data_wait_s", "{:.4f} s", False),
    ("compile", "compile_s", "{:.1f} s", False),
    ("loss (last step)", "loss", "{:.4f}", None),
)


def render(result: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """A console table; with `baseline`, a column of ratios (> 1 is better)."""
    m = result["machine"]
    head = (
        f"bench: {result['model']['params']:,} params, batch {result['batch'][0]} x "
        f"{result['batch'][1]}, mesh {result['mesh']}, {m['devices']} {m['device_kind']} "
        f"device(s); median of {result['settings']['steps']} steps"
    )
    lines = [head, "  choices: " + ", ".join(f"{k} {v}" for k, v in result["choices"].items())]
    if result.get("pipeline"):
        lines.append(f"  pipeline: {stages.describe(result['pipeline'])}")
    for label, key, fmt, higher_is_better in ROWS:
        if key not in result:  # a result written before the row existed
            continue
        line = f"  {label:<22}{fmt.format(result[key]):>16}"
        compared = higher_is_better is not None and key != "host_overhead_s"
        if compared and baseline is not None and baseline.get(key):
            ratio = result[key] / baseline[key]
            line += f"   {ratio if higher_is_better else 1 / ratio:.3f}x vs baseline"
        lines.append(line)
    return "\n".join(lines)
