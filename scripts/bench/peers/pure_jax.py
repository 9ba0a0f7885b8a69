"""The zero-overhead floor: the same Llama model and training step written by hand in plain JAX.

No framework: a dict of arrays, a Python loop over layers, one jitted step with donated state,
the same arithmetic as bigjax (K/V and gate/up as one matmul each, every projection a 2-D
matmul over the flattened batch: docs/benchmarks.md says why),
AdamW with clipping and masked weight decay (as bigjax's default), packed-document masking and
a weighted loss (as bigjax trains). The batch is synthetic and stays on the device: this is the
time of the compiled step and nothing else.

    python scripts/bench/peers/pure_jax.py --steps 5 --warmup 2

Prints one JSON line: {"peer": "pure-jax", "step_times_s": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

D, LAYERS, HEADS, FF, VOCAB, SEQ, BATCH = 512, 8, 8, 2048, 32000, 256, 8
K = D // HEADS


def init(key: jax.Array) -> dict:
    def dense(k, shape, fan_in):
        return jax.random.truncated_normal(k, -2, 2, shape, jnp.float32) / jnp.sqrt(fan_in)

    keys = iter(jax.random.split(key, 3 + 7 * LAYERS))
    layers = [
        {
            "attn_norm": jnp.ones((D,)),
            "q": dense(next(keys), (D, HEADS * K), D),
            "kv": dense(next(keys), (D, HEADS * 2 * K), D),  # [D, (heads, k|v, K)]
            "o": dense(next(keys), (HEADS * K, D), D),
            "mlp_norm": jnp.ones((D,)),
            "gate_up": dense(next(keys), (D, FF * 2), D),  # [D, (F, gate|up)]
            "down": dense(next(keys), (FF, D), FF),
        }
        for _ in range(LAYERS)
    ]
    return {
        "embed": jax.random.normal(next(keys), (VOCAB, D)) / jnp.sqrt(D),
        "layers": layers,
        "final_norm": jnp.ones((D,)),
        "head": dense(next(keys), (D, VOCAB), D),
    }


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def rope(x, positions):
    half = K // 2
    freq = 1.0 / 10000.0 ** (jnp.arange(half) / half)
    angle = positions[..., None] * freq
    sin, cos = jnp.sin(angle)[:, :, None], jnp.cos(angle)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def loss_fn(params, batch):
    tokens, seg, pos = batch["inputs"], batch["segment_ids"], batch["positions"]
    causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
    mask = causal & (seg[:, :, None] == seg[:, None, :])  # no attention across documents
    x = params["embed"][tokens].reshape(BATCH * SEQ, D)
    for p in params["layers"]:
        h = rms_norm(x, p["attn_norm"])
        q = rope((h @ p["q"]).reshape(BATCH, SEQ, HEADS, K), pos)
        kv = (h @ p["kv"]).reshape(BATCH, SEQ, HEADS, 2, K)
        k, v = rope(kv[..., 0, :], pos), kv[..., 1, :]
        scores = jnp.einsum("blhk,bshk->bhls", q, k) / jnp.sqrt(K)
        scores = jnp.where(mask[:, None], scores, -1e30)
        attn = jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(scores, axis=-1), v)
        x = x + attn.reshape(BATCH * SEQ, HEADS * K) @ p["o"]
        gate_up = (rms_norm(x, p["mlp_norm"]) @ p["gate_up"]).reshape(-1, FF, 2)
        x = x + (jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1]) @ p["down"]
    logits = (rms_norm(x, params["final_norm"]) @ params["head"]).reshape(BATCH, SEQ, VOCAB)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"]
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            1e-3,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p),
        ),
    )

    @jax.jit
    def init_state(key):
        params = init(key)
        return params, tx.init(params)

    def train_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(train_step, donate_argnums=0)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (BATCH, SEQ + 1), 0, VOCAB)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": jnp.ones((BATCH, SEQ), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ)),
        "weights": jnp.ones((BATCH, SEQ), jnp.float32),
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
    print(
        json.dumps(
            {
                "peer": "pure-jax",
                "step_times_s": times,
                "compile_s": compile_s,
                "tokens_per_step": BATCH * SEQ,
                "loss": float(loss),
            }
        )
    )


if __name__ == "__main__":
    main()
