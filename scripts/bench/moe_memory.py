"""Peak memory of one MoE layer's forward + backward, dropless (grouped matmuls) beside the
one-hot capacity dispatch, on the CPU: XLA's own accounting of the compiled program
(`memory_analysis()`: temporaries plus arguments and outputs), so no allocator noise.

A 64-expert layer (d_model 256, expert width 128, top-8, fine-grained as DeepSeek/Qwen3) on a
batch of 8 x 512 tokens; capacity factors 1.25 and 2.0 beside dropless. Prints one row per
dispatch and the ratios to dropless.

    python scripts/bench/moe_memory.py [--experts 64] [--top-k 8] [--rows 8] [--length 512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.moe import MoE, Routing


def peak_bytes(routing: Routing, d_model: int, d_ff: int, rows: int, length: int) -> int:
    with nnx.use_eager_sharding(False):
        layer = MoE(d_model, d_ff, routing, rngs=nnx.Rngs(params=0), param_dtype=jnp.float32,
                    dtype=jnp.float32, rules=())  # fmt: skip
    graphdef, params = nnx.split(layer)
    x = jax.ShapeDtypeStruct((rows, length, d_model), jnp.float32)
    valid = jax.ShapeDtypeStruct((rows, length), jnp.bool_)

    def loss(params: nnx.State, x: jax.Array, valid: jax.Array) -> jax.Array:
        out, aux = nnx.merge(graphdef, params)(x, valid)
        return jnp.sum(out**2) + aux["balance_loss"]

    compiled = jax.jit(jax.grad(loss)).lower(params, x, valid).compile()
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    a = p.parse_args()
    cases = {
        "dropless": Routing(a.experts, a.top_k, dispatch="dropless"),
        "capacity 1.25": Routing(a.experts, a.top_k, capacity_factor=1.25),
        "capacity 2.0": Routing(a.experts, a.top_k, capacity_factor=2.0),
    }
    print(f"{a.experts} experts, top-{a.top_k}, d_model {a.d_model}, width {a.d_ff}, "
          f"{a.rows} x {a.length} tokens; forward + backward, jax {jax.__version__}")  # fmt: skip
    sizes = {name: peak_bytes(r, a.d_model, a.d_ff, a.rows, a.length) for name, r in cases.items()}
    base = sizes["dropless"]
    print("| dispatch | peak MiB | x dropless |\n|---|---:|---:|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 2**20:,.1f} | {size / base:.2f} |")


if __name__ == "__main__":
    main()
