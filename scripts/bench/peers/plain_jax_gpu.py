"""The accelerator floor: the same Llama train step hand-written in plain JAX for a GPU.

No framework: a dict of arrays, layers unrolled in Python, bf16 compute on f32 parameters,
cuDNN flash attention (`jax.nn.dot_product_attention(..., implementation="cudnn",
is_causal=True)`; one document per row, the easiest case for the kernel), tied or untied
head, AdamW with clipping and masked weight decay, one jitted step with donated state. The
batch is synthetic and stays on the device.

    python scripts/bench/peers/plain_jax_gpu.py --size 1b --steps 10 --warmup 3
    python scripts/bench/peers/plain_jax_gpu.py --size tiny --attention xla   # on a CPU

Prints one JSON line: {"peer": "plain-jax", "step_times_s": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).parent))
from shapes import SHAPES  # noqa: E402


def init(key: jax.Array, s: dict) -> dict:
    d, h, g, ff = s["d"], s["heads"], s["kv_heads"], s["ff"]
    k = d // h

    def dense(key, shape, fan_in):
        return jax.random.truncated_normal(key, -2, 2, shape, jnp.float32) / jnp.sqrt(fan_in)

    keys = iter(jax.random.split(key, 3 + 5 * s["layers"]))
    params = {
        "embed": jax.random.normal(next(keys), (s["vocab"], d)) / jnp.sqrt(d),
        "final_norm": jnp.ones((d,)),
        "layers": [
            {
                "attn_norm": jnp.ones((d,)),
                "q": dense(next(keys), (d, h * k), d),
                "kv": dense(next(keys), (d, 2 * g * k), d),
                "o": dense(next(keys), (h * k, d), d),
                "mlp_norm": jnp.ones((d,)),
                "gate_up": dense(next(keys), (d, 2 * ff), d),
                "down": dense(next(keys), (ff, d), ff),
            }
            for _ in range(s["layers"])
        ],
    }
    if not s["tied"]:
        params["head"] = dense(next(keys), (d, s["vocab"]), d)
    return params


def rms_norm(x, scale):
    x32 = x.astype(jnp.float32)
    out = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * scale
    return out.astype(jnp.bfloat16)


def rope(x, positions, theta):
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle)[:, :, None], jnp.cos(angle)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def loss_fn(params, batch, s, attention):
    b, length = batch["inputs"].shape
    h, g = s["heads"], s["kv_heads"]
    k = s["d"] // h
    bf = lambda w: w.astype(jnp.bfloat16)  # noqa: E731
    x = bf(params["embed"])[batch["inputs"]]
    pos = batch["positions"]
    for p in params["layers"]:
        y = rms_norm(x, p["attn_norm"])
        q = rope((y @ bf(p["q"])).reshape(b, length, h, k), pos, s["theta"])
        kv = (y @ bf(p["kv"])).reshape(b, length, g, 2, k)
        key, value = rope(kv[..., 0, :], pos, s["theta"]), kv[..., 1, :]
        att = jax.nn.dot_product_attention(q, key, value, is_causal=True, implementation=attention)
        x = x + att.reshape(b, length, h * k) @ bf(p["o"])
        gu = (rms_norm(x, p["mlp_norm"]) @ bf(p["gate_up"])).reshape(b, length, -1, 2)
        x = x + (jax.nn.silu(gu[..., 0]) * gu[..., 1]) @ bf(p["down"])
    head = params["embed"].T if s["tied"] else params["head"]
    logits = (rms_norm(x, params["final_norm"]) @ bf(head)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return jnp.mean(nll)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", default="cudnn", help="cudnn (GPU) or xla")
    parser.add_argument("--profile", help="write a profiler trace of 3 steps to this folder")
    args = parser.parse_args()
    s = SHAPES[args.size]
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1,
                    mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)),
    )  # fmt: skip

    @jax.jit
    def init_state(key):
        params = init(key, s)
        return params, tx.init(params)

    def train_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, s, args.attention)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(train_step, donate_argnums=0)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (s["batch"], s["seq"] + 1), 0, s["vocab"])
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(s["seq"]), (s["batch"], s["seq"])),
    }
    state = init_state(key)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, loss = compiled(state, batch)
        jax.block_until_ready((state, loss))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.profile:  # after the timings: tracing slows the steps it records
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                state, loss = compiled(state, batch)
            jax.block_until_ready((state, loss))
    record = {"peer": "plain-jax", "step_times_s": times, "compile_s": compile_s,
              "tokens_per_step": s["batch"] * s["seq"], "loss": float(loss)}  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
