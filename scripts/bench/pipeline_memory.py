"""Compiled memory of the train step with and without pipeline stages, on 8 fake CPU devices:
XLA's own accounting (`memory_analysis()`), so no allocator noise. A model whose weights
outweigh its activations (8 layers, d_model 1024, d_ff 4096, batch 16 x 64, full remat), so
that whatever the pipeline keeps per weight shows.

    python scripts/bench/pipeline_memory.py

Prints, per layout, the temporaries and the arguments (the state) per device in MiB.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax starts
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from bigjax.config import from_configdict  # noqa: E402
from bigjax.mesh import make_mesh  # noqa: E402
from bigjax.program import for_config  # noqa: E402

MODEL = {"size": "tiny", "num_layers": 8, "d_model": 1024, "d_ff": 4096, "num_heads": 8,
         "num_kv_heads": 8, "vocab_size": 512, "remat": "full"}  # fmt: skip


def compiled_mib(shape: tuple[int, ...], **model: int) -> tuple[float, float]:
    cfg = from_configdict({
        "model": {**MODEL, **model},
        "data": {"batch_size": 16, "seq_len": 64},
        "mesh": {"shape": shape},
        "metrics": {"tensorboard": False, "plot": False},
    })  # fmt: skip
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        memory = prog.train_step.lower(*prog.abstract_inputs()).compile().memory_analysis()
    return memory.temp_size_in_bytes / 2**20, memory.argument_size_in_bytes / 2**20


def main() -> None:
    print(f"jax {jax.__version__}, 8 CPU devices; MiB per device")
    print("| layout | temporaries | arguments (state) |\n|---|---:|---:|")
    layouts = {
        "fsdp 8, no stages": ((1, 1, 8, 1, 1), {}),
        "2 stages x fsdp 4, 4 micro-batches": ((1, 2, 4, 1, 1), {"pipeline_microbatches": 4}),
        "the same, interleave 2": (
            (1, 2, 4, 1, 1),
            {"pipeline_microbatches": 4, "pipeline_interleave": 2},
        ),
        "the same, interleave 4": (
            (1, 2, 4, 1, 1),
            {"pipeline_microbatches": 4, "pipeline_interleave": 4},
        ),
    }
    for name, (shape, model) in layouts.items():
        temp, args = compiled_mib(shape, **model)
        print(f"| {name} | {temp:,.1f} | {args:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
