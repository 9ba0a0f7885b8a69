"""The context-parallel attention kernel of this machine's backend on one device: every
context shard's attention (`attention.context_inner`) computed in turn, put back in row
order and compared with one device's attention of the whole rows; then one shard's fwd+bwd
time and compiled temporaries for each kernel at a long sequence.

    python scripts/bench/context_check.py [--impls cudnn einsum] [--seq 32768 --parts 8]

On a GPU this is the check of cuDNN under context parallelism (the mask goes to the kernel
as a bias; no interpreter exists for it on a CPU). The shards are built here as
`context.attend` builds them under `shard_map` (balanced order, keys gathered whole), which
the CPU tests check on 8 devices. Exits 1 if a kernel is off by more than the bf16 tolerance.
Prints one JSON line per check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from attention_check import GRAD_REL, OUT_ATOL, packed_rows

from bigjax import attention, context
from bigjax.config import DEFAULT_RULES


def shards(q, k, v, seg, parts: int) -> list[context.Shard]:
    """What each of `parts` context devices holds: its balanced queries, the whole keys."""
    order = context.chunk_order(q.shape[1], parts)
    q_bal, seg_bal = q[:, order], seg[:, order]
    size = q.shape[1] // parts
    return [
        context.Shard(
            q_bal[:, i * size : (i + 1) * size],
            k,
            v,
            seg_bal[:, i * size : (i + 1) * size],
            seg,
            jnp.asarray(order[i * size : (i + 1) * size]),
        )  # fmt: skip
        for i in range(parts)
    ]


def over_context(impl: str, parts: int, seg):
    def f(q, k, v):
        outs = [attention.context_inner(impl, s, causal=True) for s in shards(q, k, v, seg, parts)]
        natural = np.argsort(context.chunk_order(q.shape[1], parts))
        return jnp.concatenate(outs, axis=1)[:, natural]

    return f


def errors(got, ref) -> tuple[float, list[float]]:
    (out, grads), (ref_out, ref_grads) = got, ref
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    out_err = float(jnp.max(jnp.abs(f32(out) - f32(ref_out))))
    grad_err = [float(jnp.max(jnp.abs(f32(a) - f32(r))) / jnp.max(jnp.abs(f32(r))))
                for a, r in zip(grads, ref_grads, strict=True)]  # fmt: skip
    return out_err, grad_err


def fwd_bwd(f, dout):
    return jax.jit(lambda *a: (f(*a), jax.vjp(f, *a)[1](dout)))


def inputs(b, length, h, g, k, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, length, h, k), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, length, g, k), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, length, g, k), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (b, length, h, k), jnp.bfloat16)
    return q, kk, v, dout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", nargs="*", default=None)
    parser.add_argument("--check-seq", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=32768, help="timed: one shard of this row")
    parser.add_argument("--parts", type=int, default=8, help="timed: context devices")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    backend = jax.default_backend()
    impls = args.impls or (["cudnn", "einsum"] if backend == "gpu" else ["einsum"])
    h, g, k = args.heads, args.kv_heads, args.head_dim
    failed = False

    # Equivalence: 2 rows of documents crossing the chunk boundaries, context 2 and 4.
    q, kk, v, dout = inputs(2, args.check_seq, h, g, k)
    seg = jnp.asarray(packed_rows(2, args.check_seq))
    f32 = [a.astype(jnp.float32) for a in (q, kk, v)]

    def one_device(q, k, v):
        return attention.attend("einsum", q, k, v, seg, causal=True, rules=DEFAULT_RULES)

    ref = fwd_bwd(one_device, dout.astype(jnp.float32))(*f32)
    for impl in impls:
        for parts in (2, 4):
            record = {"check": "equal", "impl": impl, "parts": parts, "backend": backend}
            try:
                got = fwd_bwd(over_context(impl, parts, seg), dout)(q, kk, v)
                out_err, grad_err = errors(got, ref)
                ok = out_err <= OUT_ATOL and max(grad_err) <= GRAD_REL
                record.update(out_max_abs_err=out_err, grad_max_rel_err=grad_err, ok=ok)
            except Exception as e:  # a kernel that cannot run here fails the check, says why
                ok, record["error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
            failed |= not ok
            print(json.dumps(record), flush=True)

    # Speed and memory of one device's shard at a long row (one row, one document per row
    # with a boundary in every chunk: the mask's work is the same for any documents).
    q, kk, v, dout = inputs(1, args.seq, h, g, k, seed=1)
    seg = jnp.asarray(packed_rows(1, args.seq, seed=1))
    for impl in impls:
        shard = shards(q, kk, v, seg, args.parts)[0]

        def one_shard(q, k, v, shard=shard, impl=impl):
            s = context.Shard(q, k, v, shard.q_ids_BQ, shard.kv_ids_BL, shard.places_Q)
            return attention.context_inner(impl, s, causal=True)

        fn = fwd_bwd(one_shard, dout[:, : shard.q_BQHK.shape[1]])
        record = {"check": "speed", "impl": impl, "seq": args.seq, "parts": args.parts,
                  "queries_per_device": shard.q_BQHK.shape[1]}  # fmt: skip
        try:
            compiled = fn.lower(shard.q_BQHK, kk, v).compile()
            record["temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
            jax.block_until_ready(compiled(shard.q_BQHK, kk, v))
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(compiled(shard.q_BQHK, kk, v))
                times.append(time.perf_counter() - start)
            record["fwd_bwd_median_s"] = float(np.median(times))
        except Exception as e:  # an out-of-memory shard is a result here, not a crash
            record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(record), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
