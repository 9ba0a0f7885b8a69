"""Shared test helpers: real corpus batches and running a few steps on a given mesh."""

from collections.abc import Sequence
from functools import cache

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from bigjax.config import ConfigError, MeshConfig, TrainConfig
from bigjax.data import corpus, pipeline
from bigjax.data.tokenizer import ByteTokenizer
from bigjax.mesh import make_mesh
from bigjax.program import Program, for_config


def make_dataset(
    docs: Sequence[corpus.Document],
    *,
    tokenizer: ByteTokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_workers: int,
    rows: Sequence[int] | None = None,
    packing: str = "concat",
) -> pipeline.Batches:
    """Batches of the built-in corpus (byte ranges of stdlib files), from the pipeline's own
    stages (what `train` builds from a config, without one)."""
    stream = pipeline.document_stream(
        grain.MapDataset.source(docs), pipeline.ReadTokens(tokenizer), seed=seed, shuffle=shuffle
    )
    streams = pipeline.RowStreams(stream, batch_size, seq_len, tokenizer.pad_id, packing)
    chosen = pipeline.default_rows(batch_size) if rows is None else rows
    return pipeline.Batches(streams, chosen, num_workers)


@cache
def corpus_batches(n: int, batch: int, seq_len: int, seed: int = 0) -> tuple[dict, ...]:
    """The first `n` global batches of the built-in corpus (real text, fixed order)."""
    train_docs, _ = corpus.split_stdlib(0.02, seq_len)
    ds = make_dataset(
        train_docs,
        tokenizer=ByteTokenizer(),
        seq_len=seq_len,
        batch_size=batch,
        seed=seed,
        shuffle=True,
        num_workers=0,
    )
    out = tuple(pipeline.take(ds, n))
    ds.close()
    return out


@cache
def _program(cfg: TrainConfig, mesh: Mesh) -> Program:
    """One program per (config, mesh) for the whole session: tests that train the same
    config on the same mesh share its compiled steps instead of compiling them again. A
    program is pure (its state comes from `init()`, seeded by the config), so sharing it
    changes no result."""
    return for_config(cfg, mesh)


def run_steps(cfg: TrainConfig, batches, devices=None, mesh_shape=None, mesh=None):
    """Trains on `batches` (on `mesh`, or one made from `mesh_shape` over `devices`); returns
    (per-step metrics as numpy, final state, program)."""
    shape = tuple(mesh.shape.values()) if mesh is not None else mesh_shape or cfg.mesh.shape
    mesh_cfg = MeshConfig(shape=shape, rules=cfg.mesh.rules)
    mesh = make_mesh(mesh_cfg, devices) if mesh is None else mesh
    cfg = TrainConfig(**{**cfg.__dict__, "mesh": mesh_cfg})
    with jax.set_mesh(mesh):
        prog = _program(cfg, mesh)
        state = prog.init()
        out = []
        for b in batches:
            state, m = prog.train_step(state, prog.to_global(b))
            out.append(jax.tree.map(np.asarray, m))
    return out, state, prog


def train_cmd(workdir, *extra: str, config: str = "configs/lm_tiny.py") -> list[str]:
    """The `bigjax train` command line, as a user types it, for subprocess tests."""
    import sys

    return [
        sys.executable,
        "-m",
        "bigjax.cli",
        "train",
        "--config",
        config,
        "--workdir",
        str(workdir),
        *extra,
    ]


def clipped_mean(row_grad, params, rows: int, clip_norm: float):
    """DP-SGD by hand: `row_grad(params, i)` of each row alone, clipped to `clip_norm`, then
    the mean; returns (the flat mean gradient, the rows' raw norms)."""
    import jax.numpy as jnp
    import optax

    from bigjax.tree import flatten

    total, norms = None, []
    for i in range(rows):
        g = row_grad(params, i)
        n = float(optax.tree.norm(g))
        norms.append(n)
        g = jax.tree.map(lambda x, n=n: x * min(1.0, clip_norm / n), g)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return flatten(jax.device_get(jax.tree.map(lambda x: x / rows, total))), norms


def losses_by_step(run) -> dict[int, float]:
    """{step: loss} from a run directory's metrics.jsonl."""
    from bigjax.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def assert_same_losses(run, ref, steps, rtol: float) -> None:
    """`run` logged every step of `steps` with `ref`'s losses within `rtol`."""
    import numpy as np

    got, want = losses_by_step(run), losses_by_step(ref)
    assert sorted(got) == sorted(want) == list(steps)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=rtol)


def assert_one_line_config_error(groups: dict, message: str) -> None:
    """The config of `groups` is refused with one line matching `message` (a regex)."""
    import pytest
    from conftest import tiny_config

    with pytest.raises(ConfigError, match=message) as e:
        tiny_config(**groups)
    assert "\n" not in str(e.value)


def train_tiny(run, steps: int, mesh_shape, **groups) -> None:
    """`bigjax.train` of a tiny config on `mesh_shape` into `run`, a checkpoint every 2 steps
    (a later call with more steps resumes it)."""
    from conftest import tiny_config

    from bigjax.train import train

    cfg = tiny_config(num_steps=steps, mesh={"shape": mesh_shape},
                      checkpoint={"every_steps": 2}, **groups)  # fmt: skip
    train(cfg, run)
