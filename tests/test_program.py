"""Checks that need the mesh, and the shipped big configs traced on the 8-device mesh."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config

from bigjax.cli import load_config
from bigjax.config import ConfigError
from bigjax.layers import compute_dtype
from bigjax.mesh import make_mesh
from bigjax.metrics import Writers, read_jsonl
from bigjax.program import check_program, for_config

ROOT = Path(__file__).resolve().parents[1]


def test_batch_must_split_over_the_batch_axes_of_the_rules():
    mesh = make_mesh(tiny_config(mesh={"shape": (2, 4, 1)}).mesh)
    with pytest.raises(ConfigError, match="data.batch_size.*multiple of 8"):
        check_program(tiny_config(data={"batch_size": 12}), mesh)
    # batch sharded over `data` only (2-way): 12 is fine
    check_program(tiny_config(data={"batch_size": 12}, mesh={"rules": {"act_batch": "data"}}), mesh)


def test_cudnn_attention_needs_a_gpu():
    cfg = tiny_config(model={"attention": "cudnn"})
    with pytest.raises(ConfigError, match="model.attention"):
        check_program(cfg, make_mesh(cfg.mesh))


def test_auto_dtype_is_f32_on_cpu():
    assert compute_dtype("auto") == jnp.float32 and compute_dtype("bfloat16") == jnp.bfloat16


def test_truncate_keeps_rows_up_to_the_checkpoint_and_drops_a_cut_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    w = Writers(tmp_path, enabled=True, tensorboard=False)
    w.truncate_after(2)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_truncate_names_the_damaged_rows_it_drops_but_not_a_cut_one(tmp_path, capsys):
    # a bit flip mid-file was dropped at the next resume without a word
    rows = '{"step": 1}\n{"st\xe9p": 2}\n\n{"step": 3}\n[4]\n{"step": 5}\n{"st'
    (tmp_path / "metrics.jsonl").write_text(rows)
    w = Writers(tmp_path, enabled=True, tensorboard=False)
    w.truncate_after(4)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 3]
    out = capsys.readouterr().out
    assert f"warning: {tmp_path / 'metrics.jsonl'}: line(s) 2, 5 damaged" in out, out


@pytest.mark.parametrize("name", ["llama_1b.py", "llama_8b.py"])
def test_big_configs_trace_on_the_mesh(name):
    # Shapes only: lowering traces the full train step with its shardings without allocating
    # an array, so the 8B config is checked here on a laptop.
    cfg = load_config(
        str(ROOT / "configs" / name), ["--config.data.batch_size=8", "--config.data.seq_len=128"]
    )
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        prog = for_config(cfg, mesh)
        state, batch = prog.abstract_inputs()  # batch [8, 128], the overrides above
        text = prog.train_step.lower(state, batch).as_text()
    assert "bf16" in text  # compute in bfloat16 as configured
