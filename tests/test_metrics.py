"""MFU inputs: peak table, measured CPU peak, FLOP formula vs XLA's cost analysis."""

import json

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config
from flax import nnx

from bigjax import metrics, models
from bigjax.models.llama import train_flops_per_token


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
    ],
)
def test_datasheet_peaks(kind, peak):
    assert metrics.datasheet_peak(kind) == peak


def test_unknown_device_is_an_error_unless_peak_given():
    with pytest.raises(metrics.UnknownDeviceError, match="metrics.peak_flops"):
        metrics.datasheet_peak("Quantum Abacus 9000")
    assert metrics.total_peak_flops(jax.devices()[:4], per_device=1e12) == 4e12


def test_cpu_peak_is_measured_and_plausible():
    peak = metrics.total_peak_flops(jax.devices())
    assert 1e9 < peak < 1e13  # a real CPU: between 1 GFLOP/s and 10 TFLOP/s


def test_flop_formula_matches_xla_cost_analysis():
    cfg = tiny_config(
        model={
            "d_model": 128,
            "d_ff": 512,
            "vocab_size": 512,
            "num_layers": 2,
            "scan_layers": False,
        }
    )
    model = models.build(cfg.model, cfg.mesh.rules, 0)
    graphdef, state = nnx.split(model)
    B, L = 4, 128
    tokens = jnp.zeros((B, L), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))

    def loss(s):
        return nnx.merge(graphdef, s)(tokens, jnp.ones_like(tokens), pos).sum()

    compiled = jax.jit(jax.grad(loss)).lower(state).compile()
    xla = compiled.cost_analysis()["flops"]
    formula = train_flops_per_token(cfg.model, L) * B * L
    # XLA counts full (not causal) attention and elementwise ops; the formula counts model
    # FLOPs. They must agree on the dominant matmul work within 25%.
    assert 0.9 < xla / formula < 1.25, (xla, formula)


def test_progress_line_shows_bar_and_eta():
    row = dict(step=50, loss=2.5, tokens_per_sec=1234.5, mfu=0.123, step_time=0.2, eta_s=3725)
    line = metrics.progress_line(row, 100)
    assert "50/100" in line and "#" * 10 in line and "1:02:05" in line and "12.3%" in line


def test_smoothing_has_no_start_up_bias_and_follows_a_step():
    assert metrics.smoothed([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])
    step = metrics.smoothed([1.0] * 10 + [2.0] * 50, 0.8)
    assert step[0] == pytest.approx(1.0) and step[9] == pytest.approx(1.0)  # not pulled to 0
    rising = all(a <= b + 1e-12 for a, b in zip(step, step[1:], strict=False))  # f64 rounding
    assert rising and step[-1] == pytest.approx(2.0, 1e-4)


def test_loss_plot_is_titled_and_log_scaled(tmp_path):
    import matplotlib.pyplot as plt

    rows = [{"step": s, "loss": 6.0 / s**0.5} for s in range(1, 101)]
    fig = metrics.loss_figure([*rows, {"step": 100, "eval_loss": 0.7}], "my run")
    (ax,) = fig.axes
    assert ax.get_title() == "my run" and ax.get_yscale() == "log"
    raw, smooth, evals = ax.get_lines()
    assert raw.get_alpha() < 0.5 and smooth.get_alpha() is None  # the raw curve faint behind
    assert list(smooth.get_ydata()) == pytest.approx(
        metrics.smoothed([r["loss"] for r in rows], 0.9)
    )
    plt.close(fig)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics.plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_a_non_finite_loss_is_a_gap_in_the_plot():
    # bigjax writes a non-finite loss as null; the smoothing used to fail on None (at the end
    # of a run that had resumed past such a row), and a NaN would poison every later point
    import matplotlib.pyplot as plt

    rows = [{"step": s, "loss": 2.0} for s in range(1, 11)]
    rows[4]["loss"] = None
    fig = metrics.loss_figure([*rows, {"step": 10, "eval_loss": None}], "gap")
    raw, smooth = fig.axes[0].get_lines()  # no eval line: its one point was not finite
    assert list(raw.get_xdata()) == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert list(smooth.get_ydata()) == pytest.approx([2.0] * 9)
    plt.close(fig)
