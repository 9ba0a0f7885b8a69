"""What context parallelism saves: the train step compiled for a TPU topology (libtpu's
compile-only devices, on this CPU) with the sequence split over `context`, beside the same
devices as FSDP. XLA's own accounting of the compiled program (`memory_analysis()`), and the
all-gathers in it that collect a whole sequence of activations anywhere but in attention's
`shard_map` (its keys, values and segment ids are gathered by design: docs/scaling.md).

A 2-layer model (d_model 256, d_ff 1536, 4 heads, bf16) at 8 x 2048 tokens on a v5p-8
(4 chips), for each remat policy, and with a capacity MoE (4 experts, top 2).

    python scripts/bench/context_memory.py [--topology v5p:2x2x1]

Prints, per case and layout, the temporaries per device in MiB, their ratio to FSDP's, and
the count of those gathers (0 is right).
"""

from __future__ import annotations

import argparse
import re

import jax
from jax.experimental import topologies

from bigjax import platforms
from bigjax.config import from_configdict
from bigjax.mesh import for_run
from bigjax.program import for_config

SEQ_LEN = 2048
MODEL = {"size": "tiny", "num_layers": 2, "d_model": 256, "d_ff": 1536, "num_heads": 4,
         "num_kv_heads": 4, "dtype": "bfloat16"}  # fmt: skip
CASES = {
    "remat none": {"remat": "none"},
    "remat save_matmuls": {"remat": "save_matmuls"},
    "remat full": {"remat": "full"},
    "capacity MoE": {"remat": "none", "num_experts": 4, "experts_per_token": 2},
}
# (data, stage, fsdp, context, tensor, expert)
LAYOUTS = {"fsdp 4": (1, 1, 4, 1, 1, 1), "context 4": (1, 1, 1, 4, 1, 1),
           "fsdp 2 x context 2": (1, 1, 2, 2, 1, 1)}  # fmt: skip
# "%name = bf16[8,2048,1536]{...} all-gather(...)": a gathered [rows, L, ...]
WHOLE_ROWS = re.compile(rf"= \S*\[\d+,{SEQ_LEN}[,\]]\S* all-gather(-start)?\(")


def compiled(devices: list, shape: tuple[int, ...], model: dict) -> tuple[float, int]:
    """(temporaries per device in MiB, whole-sequence gathers outside attention)."""
    cfg = from_configdict({
        "model": {**MODEL, **model},
        "data": {"batch_size": 8, "seq_len": SEQ_LEN},
        "mesh": {"shape": shape},
        "metrics": {"tensorboard": False, "plot": False},
    })  # fmt: skip
    cfg, mesh = for_run(cfg, devices)
    prog = for_config(cfg, mesh)
    with jax.set_mesh(mesh):
        executable = prog.train_step.lower(*prog.abstract_inputs()).compile()
    hlo = executable.as_text()
    gathers = [g for g in hlo.splitlines() if WHOLE_ROWS.search(g) and "shard_map" not in g]
    return executable.memory_analysis().temp_size_in_bytes / 2**20, len(gathers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5p:2x2x1", help="libtpu's name: GENERATION:SHAPE")
    a = p.parse_args()
    platforms.allow_compile_only_libtpu()
    topo = topologies.get_topology_desc(
        topology_name=a.topology, platform="tpu", chip_config_name="megacore"
    )
    devices = list(topo.devices)
    print("| case | layout | temporaries per device | vs fsdp 4 | whole-sequence gathers |")
    print("|---|---|---:|---:|---:|")
    for case, model in CASES.items():
        base = None
        for layout, shape in LAYOUTS.items():
            mib, gathers = compiled(devices, shape, model)
            base = base or mib
            print(f"| {case} | {layout} | {mib:,.0f} MiB | {mib / base:.2f}x | {gathers} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
