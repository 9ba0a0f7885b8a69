"""Scaling tables from the compiler: per-device FLOPs and memory of the train step on 1 -> 8
devices under FSDP and tensor parallelism, and the compile time of the 8b model.

    python scripts/bench/scaling.py --out runs/bench_scaling

Fake CPU devices measure nothing about speed, but XLA's cost and memory analysis of the
partitioned program is exact: it says how the work and the bytes divide as devices are added,
and what collectives cost in bytes. Nothing is allocated: the step is compiled for abstract
arrays carrying the shardings.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from bigjax.config import from_configdict  # noqa: E402
from bigjax.mesh import make_mesh  # noqa: E402
from bigjax.plan import abstract_step_inputs  # noqa: E402
from bigjax.program import for_config  # noqa: E402

GiB = 2**30


def compile_step(raw: dict, devices: int) -> tuple[jax.stages.Compiled, float]:
    cfg = from_configdict(raw)
    mesh = make_mesh(cfg.mesh, jax.devices()[:devices])
    prog = for_config(cfg, mesh)
    with jax.set_mesh(mesh):
        state, batch = abstract_step_inputs(prog)
        start = time.perf_counter()
        compiled = prog.train_step.lower(state, batch).compile()
    return compiled, time.perf_counter() - start


_COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s8": 1}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces per device in one step, read off the optimised
    HLO (an async pair counted once, at its -start). Exact for unrolled layers; a scanned
    body's collectives run once per layer but appear once in the text."""
    totals: dict[str, int] = {}
    for shape, kind in _COLLECTIVE.findall(hlo_text):
        arrays = _ARRAY.findall(shape)
        if shape.startswith("(") and kind != "all-reduce":
            arrays = arrays[len(arrays) // 2 :]  # async (operands, results): count the results
        nbytes = 0
        for dtype, dims in arrays:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            nbytes += n * _DTYPE_BYTES.get(dtype, 4)
        totals[kind] = totals.get(kind, 0) + nbytes
    return totals


def per_device(compiled: jax.stages.Compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return {
        "flops": cost.get("flops", float("nan")),
        "bytes_accessed": cost.get("bytes accessed", float("nan")),
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "collective_bytes": collective_bytes(compiled.as_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench_scaling")
    parser.add_argument("--skip-8b", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # lm_small's model with a 32k vocabulary, batch 16 x 256 so that 8 devices get 2 rows each;
    # unrolled, so that every collective appears in the HLO as often as it runs
    small = {
        "model": {"size": "small", "vocab_size": 32000, "scan_layers": False},
        "data": {"batch_size": 16, "seq_len": 256},
    }
    rows = []
    for kind, shape_of in (("fsdp", lambda n: (1, n, 1)), ("tensor", lambda n: (1, 1, n))):
        for n in (1, 2, 4, 8):
            compiled, seconds = compile_step({**small, "mesh": {"shape": shape_of(n)}}, n)
            rows.append({"parallelism": kind, "devices": n, **per_device(compiled)})
            print(rows[-1], flush=True)
    result = {"small": rows}

    if not args.skip_8b:
        big = {
            "model": {"size": "8b", "dtype": "bfloat16", "remat": "full"},
            "data": {"batch_size": 8, "seq_len": 4096},
            "mesh": {"shape": (1, 8, 1)},
        }
        result["8b_compile"] = []
        for scan in (True, False):
            raw = {**big, "model": {**big["model"], "scan_layers": scan}}
            compiled, seconds = compile_step(raw, 8)
            entry = {"scan_layers": scan, "compile_s": seconds, **per_device(compiled)}
            result["8b_compile"].append(entry)
            print(entry, flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    base = {r["parallelism"]: r for r in rows if r["devices"] == 1}
    print(
        "| parallelism | devices | GFLOP / device | × of 1 device | args / device "
        "| temp / device | collectives / device |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["flops"] / base[r["parallelism"]]["flops"]
        comm = ", ".join(
            f"{k} {v / 2**20:,.0f} MiB" for k, v in sorted(r["collective_bytes"].items())
        )
        print(
            f"| {r['parallelism']} | {r['devices']} | {r['flops'] / 1e9:,.1f} | {ratio:.3f} | "
            f"{r['argument_bytes'] / 2**20:,.0f} MiB | {r['temp_bytes'] / 2**20:,.0f} MiB | "
            f"{comm or '-'} |"
        )
    for e in result.get("8b_compile", []):
        print(
            f"8b, scan_layers={e['scan_layers']}: compile {e['compile_s']:.1f} s, "
            f"args {e['argument_bytes'] / GiB:.2f} GiB/device, temp {e['temp_bytes'] / GiB:.2f} GiB"
        )


if __name__ == "__main__":
    main()
