"""The attention kernels on this machine's backend against the einsum path: outputs and
gradients on packed rows (several documents, padding), bf16, and each kernel's fwd+bwd time.

    python scripts/bench/attention_check.py [--impls cudnn xla] [--batch 8 --seq 2048]

On a GPU this is the check of `cudnn` (no interpreter exists for it on a CPU); exits 1 if a
kernel is off by more than the bf16 tolerance below. Prints one JSON line per kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bigjax import attention
from bigjax.config import DEFAULT_RULES

# bf16 inputs, f32 accumulation in every kernel: outputs of magnitude ~1 agree to a few bf16
# ulps (2^-8 each); gradients, sums over the sequence, to a few percent of their scale.
OUT_ATOL, GRAD_REL = 2e-2, 5e-2


def packed_rows(batch: int, seq: int, seed: int = 0, longest: int = 0) -> np.ndarray:
    """Rows of documents of random lengths (8..`longest` tokens, default seq/2), the last
    row's tail padding; at most as many documents as cuDNN's bound takes."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos, doc = 0, 1
        while pos < seq and doc < attention.CUDNN_MAX_SEGMENTS - 1:
            n = int(rng.integers(8, longest or seq // 2))
            seg[b, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    seg[-1, -seq // 8 :] = 0
    return seg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    backend = jax.default_backend()
    impls = args.impls or {"gpu": ["cudnn", "xla"], "tpu": ["splash", "xla"]}.get(
        backend, ["xla", "splash"]
    )
    b, length, h, g, k = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, length, h, k), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, length, g, k), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, length, g, k), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (b, length, h, k), jnp.bfloat16)
    failed = False
    layouts = (("few documents", length), ("long documents", 0), ("short documents", 64))
    for layout, longest in layouts:
        seg = jnp.asarray(packed_rows(b, length, longest=longest))
        runs = int(attention.segment_runs(np.asarray(seg)).max())
        failed |= check(impls, q, kk, v, dout, seg, {"layout": layout, "max_runs": runs})
    sys.exit(1 if failed else 0)


def check(impls, q, kk, v, dout, seg, about) -> bool:
    """Each kernel against the einsum path on one layout of documents; True if one fails."""
    backend = jax.default_backend()

    def fwd_bwd(impl):
        def f(q, kk, v):
            out = attention.attend(impl, q, kk, v, seg, causal=True, rules=DEFAULT_RULES)
            return out, jax.vjp(
                lambda *a: attention.attend(impl, *a, seg, causal=True, rules=DEFAULT_RULES),
                q, kk, v,
            )[1](dout)  # fmt: skip

        return jax.jit(f)

    ref_out, ref_grads = fwd_bwd("einsum")(q, kk, v)
    failed = False
    for impl in impls:
        fn = fwd_bwd(impl)
        out, grads = fn(q, kk, v)
        jax.block_until_ready(grads)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            jax.block_until_ready(fn(q, kk, v))
            times.append(time.perf_counter() - start)
        out_err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
        grad_err = [
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))))
            / float(jnp.max(jnp.abs(r.astype(jnp.float32))))
            for a, r in zip(grads, ref_grads, strict=True)
        ]
        ok = out_err <= OUT_ATOL and max(grad_err) <= GRAD_REL
        failed |= not ok
        record = {"impl": impl, "backend": backend, **about, "out_max_abs_err": out_err,
                  "grad_max_rel_err": grad_err, "ok": ok,
                  "fwd_bwd_median_s": float(np.median(times))}  # fmt: skip
        print(json.dumps(record), flush=True)
    return failed


if __name__ == "__main__":
    main()
