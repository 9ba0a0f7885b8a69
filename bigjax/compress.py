"""Post-training compression: weight-only int8/int4 quantization and magnitude pruning.

Quantization is symmetric and per output channel: for a weight W [*lead, *in, *out] every
output channel (and layer) gets its own scale max|W| / qmax over the input dims, q = round(W /
scale) in [-qmax, qmax] (int8: 127, int4: 7). int4 values are packed two to a byte. Matmuls
still run in floating point on the dequantized weights (weight-only, "w8a16"/"w4a16"): the
saving is memory and disk, and the report says what it costs in loss.

Pruning zeroes the smallest-magnitude weights of every matrix: unstructured (a share of each
matrix) or 2:4 (in every group of 4 consecutive input weights of an output channel, the 2
largest survive: the pattern sparse tensor cores run). Fine-tuning with
`finetune.keep_sparsity` keeps pruned weights at zero.

Embeddings, norms and biases are left alone: what is compressed are the matrices of
`lora.N_IN` (attention, MLP, LM head) and the MoE experts, by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bigjax.lora import N_IN

# MoE expert weights [E, in, out]: experts are channels like layers.
EXPERT_N_IN = {"gate_up_EDFC": 1, "down_EFD": 1}


def matrix_layout(path: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(leading channel axes, input axes) of a compressible weight, or None."""
    name = path.rsplit("/", 1)[-1]
    lead = 1 if path.startswith("blocks/") else 0
    if name in N_IN:
        return lead, N_IN[name]
    if name in EXPERT_N_IN:
        return lead + 1, EXPERT_N_IN[name]
    return None


def _as_matrix(w: np.ndarray, lead: int, n_in: int) -> np.ndarray:
    """[*lead, *in, *out] -> [prod(lead), prod(in), prod(out)]."""
    shape = w.shape
    return w.reshape(
        math.prod(shape[:lead]),
        math.prod(shape[lead : lead + n_in]),
        math.prod(shape[lead + n_in :]),
    )


def quantize(w: np.ndarray, lead: int, n_in: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [M, I, O] in [-qmax, qmax], scales float32 [M, 1, O])."""
    qmax = 2 ** (bits - 1) - 1
    m = _as_matrix(np.asarray(w, np.float32), lead, n_in)
    scale = np.max(np.abs(m), axis=1, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(m / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (q.astype(np.float32) * scale).reshape(shape)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-7, 7] -> uint8, two per byte (low nibble first); pads to even."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def quantize_params(
    flat: Mapping[str, np.ndarray], bits: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(dequantized parameters, stored tensors: packed values and scales per weight)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    out, stored = {}, {}
    for path, w in flat.items():
        layout = matrix_layout(path, w.shape)
        if layout is None:
            out[path], stored[path] = w, np.asarray(w)
            continue
        q, scale = quantize(w, *layout, bits)
        out[path] = dequantize(q, scale, w.shape).astype(w.dtype)
        stored[f"{path}.q"] = pack_int4(q) if bits == 4 else q.reshape(-1)
        stored[f"{path}.scale"] = scale.reshape(-1)
    return out, stored


def prune_params(flat: Mapping[str, np.ndarray], sparsity: float, pattern: str) -> dict:
    """Magnitude-pruned parameters: `pattern` 'unstructured' (the smallest `sparsity` share of
    each matrix) or '2:4' (2 of every 4 consecutive input weights per output channel)."""
    out = {}
    for path, w in flat.items():
        layout = matrix_layout(path, w.shape)
        if layout is None:
            out[path] = w
            continue
        m = _as_matrix(np.asarray(w), *layout).copy()
        if pattern == "2:4":
            if m.shape[1] % 4:
                raise ValueError(f"{path}: 2:4 needs the input size {m.shape[1]} divisible by 4")
            groups = m.transpose(0, 2, 1).reshape(m.shape[0], m.shape[2], -1, 4)
            order = np.argsort(np.abs(groups), axis=-1)  # ascending: the first 2 go
            np.put_along_axis(groups, order[..., :2], 0.0, axis=-1)
            m = groups.reshape(m.shape[0], m.shape[2], m.shape[1]).transpose(0, 2, 1)
        elif pattern == "unstructured":
            k = int(round(sparsity * m[0].size))
            for i in range(m.shape[0]):  # per layer: every layer loses the same share
                if k:
                    cut = np.partition(np.abs(m[i]).ravel(), k - 1)[k - 1]
                    m[i][np.abs(m[i]) <= cut] = 0.0
        else:
            raise ValueError(f"pattern must be 'unstructured' or '2:4', got {pattern!r}")
        out[path] = m.reshape(w.shape).astype(w.dtype)
    return out


def sparsity_report(flat: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Share of exact zeros in each compressible matrix, and over all of them."""
    rows, zeros, total = {}, 0, 0
    for path, w in flat.items():
        if matrix_layout(path, w.shape) is None:
            continue
        z = int(np.sum(w == 0))
        rows[path] = z / w.size
        zeros, total = zeros + z, total + w.size
    rows["all matrices"] = zeros / max(total, 1)
    return rows


def compress_run(
    workdir: str,
    overrides: Sequence[str],
    method: str,
    out_dir: str,
    bits: int = 8,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
) -> dict[str, Any]:
    """Quantizes or prunes a trained run's weights into `out_dir` (a run directory of its own,
    plus compress.json); returns the report: eval before and after, sizes or sparsity."""
    from bigjax import errors, trained
    from bigjax.config import ConfigError

    if method == "prune" and pattern == "unstructured" and not 0 <= sparsity < 1:  # NaN too
        raise ConfigError(f"compress prune: --sparsity {sparsity}: the share of each matrix "
                          "set to zero, from 0 up to (not including) 1.")  # fmt: skip
    trained.check_outside(workdir, out_dir, "compress")  # before the evals, not after
    trained.check_new_run_dir(Path(out_dir))
    run = trained.open_run(workdir, overrides, "compress", reads_data=True)
    # its only writes are into out_dir: a full disk's one-line error names it
    with errors.writing(out_dir), run as (prog, params, step):
        import jax
        import numpy as np

        from bigjax import progress, tensorfile
        from bigjax.config import to_dict
        from bigjax.evals import run_eval
        from bigjax.metrics import json_text
        from bigjax.tree import flatten, unflatten

        flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
        # the work: eval before, compress, eval after (eval.num_batches each), write
        bar = progress.Bar(f"compress {method}", 2 * prog.cfg.eval.num_batches + 2, "steps")
        bar.update(0, note="eval before")
        before = run_eval(prog, params, bar)
        bar.update(bar.done, note=method)
        extra: dict[str, Any] = {}
        if method == "quantize":
            new, stored = quantize_params(flat, bits)
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            tensorfile.write(out / "quantized.safetensors", stored, {"bits": str(bits)})
            extra = {
                "bits": bits,
                "f32_bytes": sum(v.nbytes for v in flat.values()),
                "quantized_bytes": (out / "quantized.safetensors").stat().st_size,
            }
        else:
            new = prune_params(flat, sparsity, pattern)
            extra = {"pattern": pattern, "sparsity": sparsity_report(new)}
        new_params = jax.device_put(unflatten(new), prog.shardings.params)
        bar.advance(note="eval after")
        after = run_eval(prog, new_params, bar)
        report = {"method": method, "step": step, "before": before, "after": after, **extra}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        # before the checkpoints, which are renamed in last: they make the directory a run
        trained.write_text(Path(out_dir) / "compress.json", json_text(report, indent=2) + "\n")
        trained.write_params_run(Path(out_dir), to_dict(prog.cfg), unflatten(new),
                                 prog.resources.tokenizer, compressed_from=workdir)  # fmt: skip
        bar.advance(note="written")
        bar.close()
    return report
