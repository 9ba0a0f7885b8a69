"""Robustness: embedding-space FGSM/PGD (bounded, loss-increasing, trained against, sharded
equal to one device), text corruption of inputs only, image flips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from helpers import corpus_batches, run_steps

from bigjax import robust
from bigjax.train import train


def test_attacks_stay_in_the_ball_and_raise_the_loss():
    w = jax.random.normal(jax.random.key(0), (4, 6, 8))
    loss = lambda d: jnp.sum(jnp.sin(w + d) * w)  # noqa: E731
    for kind in ("fgsm", "pgd"):
        a = robust.Adversary(kind, epsilon=0.05, steps=5, step_size=0.02, weight=0.5)
        delta = robust.perturbation(loss, w.shape, a)
        assert float(jnp.max(jnp.abs(delta))) <= 0.05 + 1e-7
        assert float(loss(delta)) > float(loss(jnp.zeros_like(w)))
    fgsm = robust.perturbation(loss, w.shape, robust.Adversary("fgsm", 0.05, 1, 0.02, 0.5))
    np.testing.assert_allclose(jnp.abs(fgsm), 0.05)  # one full signed step


@pytest.mark.slow
def test_adversarial_training_logs_a_higher_loss_under_attack_and_shards():
    cfg = tiny_config(robust={"adversarial": "pgd", "epsilon": 0.05, "pgd_steps": 2,
                              "pgd_step_size": 0.03})  # fmt: skip
    batches = corpus_batches(2, 16, 64)
    ref, _, _ = run_steps(cfg, batches, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    got, _, _ = run_steps(cfg, batches, mesh_shape=(2, 2, 2))
    for a, b in zip(got, ref, strict=True):  # f32 reduction order only: 1e-5 (attack: 1e-4)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["adv_loss"], b["adv_loss"], rtol=1e-4)
        assert float(a["adv_loss"]) > float(a["loss"])  # the attack hurts


@pytest.mark.slow
def test_eval_attack_reports_a_robust_loss(tmp_path):
    cfg = tiny_config(num_steps=3, data={"seq_len": 64},
                      robust={"eval_attack": "fgsm", "epsilon": 0.05})  # fmt: skip
    out = train(cfg, tmp_path / "run")
    assert out["eval_adv_loss"] > out["eval_loss"]


def test_text_corruption_touches_inputs_only():
    b = corpus_batches(1, 16, 64)[0]
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    t = robust.TextNoise(token_dropout=0.1, span_mask=0.2, span_length=3, mask_id=300,
                         random_below=259)  # fmt: skip
    out = robust.corrupt_text(batch, jax.random.key(0), t)
    for k in ("targets", "weights", "segment_ids", "positions"):
        np.testing.assert_array_equal(out[k], batch[k])
    changed = np.asarray(out["inputs"] != batch["inputs"])
    assert 0.15 < changed.mean() < 0.45  # ~10 % dropped + ~20 % in spans (overlaps)
    masked = np.asarray(out["inputs"] == 300)
    # spans: masked tokens come in runs (most masked tokens have a masked neighbour)
    neighbour = masked[:, 1:] & masked[:, :-1]
    assert neighbour.sum() > 0.5 * masked.sum()
    assert not (masked & (np.asarray(batch["segment_ids"]) == 0)).any()


def test_image_augmentation_flips_when_asked():
    from bigjax.data import images

    img = np.zeros((8, 8, 1), np.float32)
    img[:, 0] = 1.0  # a bar on the left edge
    aug = images.Augment(max_shift=0, contrast=0.0, flip=True)
    flipped = [aug.random_map({"image": img}, np.random.default_rng(s))["image"] for s in range(20)]
    right = [f[:, 7, 0].mean() == 1.0 for f in flipped]
    assert 3 < sum(right) < 17  # about half are mirrored


def test_robust_config_errors():
    from bigjax.config import ConfigError, from_configdict

    with pytest.raises(ConfigError, match="robust.adversarial"):
        from_configdict({"robust": {"adversarial": "cw"}})
