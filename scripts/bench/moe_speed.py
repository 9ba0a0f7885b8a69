"""Speed of a MoE layer's grouped matmuls on this machine's default device, forward + backward:
XLA's `ragged_dot` against bigjax's tiled scan (bigjax/experts.py picks `ragged_dot` on TPU
and the scan elsewhere: this is the measurement that choice wants per backend), each in the
compute dtype and in fp8, then the whole layer, dropless beside the capacity dispatch.

The grouped product is the gate/up projection of every (token, expert) assignment, rows sorted
by expert, uniform routing; FLOPs = 3 products x 2 x rows x d_model x 2 d_ff. Each figure is the
median of `--reps` timed calls after one warm-up (compile excluded), one JSON line per case and
a markdown table with each case's ratio to `ragged_dot`.

    python scripts/bench/moe_speed.py [--experts 128] [--top-k 8] [--d-model 2048]
        [--d-ff 768] [--tokens 8192] [--dtype bfloat16] [--reps 10]

Defaults are Qwen3-30B-A3B's layer (128 experts of width 768, top-8) over 8192 tokens; on a
CPU use e.g. `--experts 8 --d-model 64 --d-ff 32 --tokens 256 --dtype float32 --reps 2`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax import experts
from bigjax.moe import MoE, Routing


def median_ms(fn: Callable[[], object], reps: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def grouped_cases(a: argparse.Namespace, dtype: jnp.dtype) -> dict[str, Callable[[], object]]:
    """Forward + both gradients of one grouped product, each implementation."""
    kx, kw, ke = jax.random.split(jax.random.key(0), 3)
    rows = a.tokens * a.top_k
    x = jax.random.normal(kx, (rows, a.d_model), dtype)
    w = (jax.random.normal(kw, (a.experts, a.d_model, 2 * a.d_ff)) / a.d_model**0.5).astype(dtype)
    sizes = jnp.bincount(jax.random.randint(ke, (rows,), 0, a.experts), length=a.experts)
    sizes = sizes.astype(jnp.int32)

    def timed(product: Callable[..., jax.Array]) -> Callable[[], object]:
        step = jax.jit(jax.grad(lambda x, w: jnp.sum(product(x, w).astype(jnp.float32)), (0, 1)))
        return lambda: step(x, w)

    return {
        "grouped, ragged_dot": timed(lambda x, w: experts.grouped_matmul(x, w, sizes, ragged=True)),
        "grouped, tiled scan": timed(
            lambda x, w: experts.grouped_matmul(x, w, sizes, ragged=False)
        ),
        **{
            f"grouped, tiled scan, tile {t}": timed(
                lambda x, w, t=t: experts.tiled_grouped_matmul(x, w, sizes, tile=t)
            )
            for t in a.tiles
        },
        "grouped fp8, this platform's path": timed(
            lambda x, w: experts.fp8_grouped_matmul(x, w, sizes)
        ),
    }


def layer_cases(a: argparse.Namespace, dtype: jnp.dtype) -> dict[str, Callable[[], object]]:
    """Forward + backward of the whole MoE layer (router, dispatch, experts, combine)."""
    x = jax.random.normal(jax.random.key(1), (a.tokens // 512 or 1, min(a.tokens, 512), a.d_model))
    x, valid = x.astype(dtype), jnp.ones(x.shape[:2], bool)
    cases = {}
    for name, routing, fp8 in (
        ("layer, dropless", Routing(a.experts, a.top_k, dispatch="dropless"), False),
        ("layer, dropless fp8", Routing(a.experts, a.top_k, dispatch="dropless"), True),
        ("layer, capacity 1.25", Routing(a.experts, a.top_k, capacity_factor=1.25), False),
    ):
        with nnx.use_eager_sharding(False):
            layer = MoE(a.d_model, a.d_ff, routing, rngs=nnx.Rngs(params=0),
                        param_dtype=jnp.float32, dtype=dtype, rules=(), fp8=fp8)  # fmt: skip
        graphdef, params = nnx.split(layer)

        def loss(params: nnx.State, graphdef: nnx.GraphDef = graphdef) -> jax.Array:
            out, aux = nnx.merge(graphdef, params)(x, valid)
            return jnp.sum(out.astype(jnp.float32) ** 2) + aux["balance_loss"]

        step = jax.jit(jax.grad(loss))
        cases[name] = lambda step=step, params=params: step(params)
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=768)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tiles", type=int, nargs="*", default=[], help="more row tiles of the scan")
    a = p.parse_args()
    dtype = jnp.dtype(a.dtype)
    device = jax.devices()[0]
    print(f"{a.experts} experts, top-{a.top_k}, d_model {a.d_model}, width {a.d_ff}, "
          f"{a.tokens} tokens, {a.dtype}; {device.device_kind}, jax {jax.__version__}")  # fmt: skip
    flops = 3 * 2 * a.tokens * a.top_k * a.d_model * 2 * a.d_ff  # the grouped cases' product
    rows = []
    for name, fn in {**grouped_cases(a, dtype), **layer_cases(a, dtype)}.items():
        row: dict[str, object] = {"case": name, "device": device.device_kind}
        try:
            ms = median_ms(fn, a.reps)
        except Exception as e:  # e.g. a backend's ragged_dot lowered densely runs out of memory
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        else:
            row["ms"] = ms
            if name.startswith("grouped"):
                row["tflops"] = flops / ms / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0].get("ms")
    print("| case | ms (median) | TFLOP/s | x ragged_dot |\n|---|---:|---:|---:|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['case']} | {r['error']} | | |")
            continue
        tflops = f"{r['tflops']:.3g}" if "tflops" in r else ""
        ratio = f"{r['ms'] / base:.2f}" if base else ""  # type: ignore[operator]
        print(f"| {r['case']} | {r['ms']:.2f} | {tflops} | {ratio} |")


if __name__ == "__main__":
    main()
