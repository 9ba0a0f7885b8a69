"""`bigjax convert`: a Hugging Face model directory <-> a bigjax run directory.

Import writes a run directory (config.json and a parameters-only checkpoint at step 0) that
`bigjax generate`, `bigjax eval` and fine-tuning (`checkpoint.init_from`) open like any run.
Export writes config.json and safetensors (sharded above `max_shard_bytes`) that transformers'
`from_pretrained` loads. The tensor mapping lives in `bigjax.hf`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from bigjax import checkpoint, hf, models, tensorfile
from bigjax.config import DataConfig, TrainConfig, from_configdict, to_dict
from bigjax.tree import flatten, unflatten

EXPORT_DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json with a `model_type`."""
    config = Path(path) / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def import_hf(src: str | Path, dst: str | Path, config: dict[str, Any]) -> TrainConfig:
    """Hugging Face directory `src` -> bigjax run directory `dst`. `config` holds extra
    settings for the run (nested dict, e.g. {"data": {"seq_len": 512}}); `model.*` comes from
    the Hugging Face config.json."""
    src, dst = Path(src), Path(dst)
    raw = json.loads((src / "config.json").read_text())
    model = {**config.get("model", {}), **hf.model_fields(raw)}
    data = dict(config.get("data", {}))
    if "max_positions" in model and "seq_len" not in data:  # fit the default to the table
        data["seq_len"] = min(DataConfig().seq_len, model["max_positions"])
    cfg = from_configdict({**config, "model": model, "data": data})
    _, abstract = models.abstract(cfg.model, cfg.mesh.rules)
    layout = checkpoint.param_layout(nnx.to_pure_dict(abstract))
    flat = hf.from_hf(cfg.model, tensorfile.read_dir(src), layout, np.dtype(cfg.model.param_dtype))
    checkpoint.write_params_run(
        dst, to_dict(cfg), unflatten(flat), imported_from=str(src.absolute())
    )
    return cfg


def export_hf(
    cfg: TrainConfig, params: Any, dst: str | Path, dtype: str, max_shard_bytes: int
) -> list[str]:
    """A run's parameters (a pure dict, possibly sharded) -> Hugging Face directory `dst`;
    returns the files written."""
    if dtype not in EXPORT_DTYPES:
        raise hf.ConvertError(f"--dtype {dtype!r}: use one of {list(EXPORT_DTYPES)}.")
    config = hf.hf_config(cfg.model, cfg.data.seq_len, dtype)  # raises if not representable
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
    tensors = {
        k: np.ascontiguousarray(v).astype(EXPORT_DTYPES[dtype])
        for k, v in hf.to_hf(cfg.model, flat).items()
    }
    dst = Path(dst)
    files = tensorfile.write_dir(dst, tensors, max_shard_bytes)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [*files, "config.json"]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10}
    units |= {"MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    number = t.rstrip("KMGIB")
    unit = t[len(number) :]
    if not number or unit not in units:
        raise hf.ConvertError(f"--max-shard-size {text!r}: use e.g. 5GB, 500MB or 2GiB.")
    return int(float(number) * units[unit])
