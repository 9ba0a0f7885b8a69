"""Do the ViT's Grain augmentations (random shifts, brightness, contrast) make it more accurate
and more robust to shifted, dimmed, low-contrast or noisy digits? Baseline (augmentations on,
as in configs/vit_digits.py) against no augmentation, 3 seeds each, identical data order.

    bigjax sweep experiments/augment_robustness/ablation.py
    bigjax report runs/sweeps/augment_robustness --out experiments/augment_robustness/results
    python experiments/augment_robustness/measure.py runs/sweeps/augment_robustness
"""

from bigjax.sweep import ablation


def get_sweep():
    return ablation(
        "augment_robustness",
        "configs/vit_digits.py",
        {"no_augment": {"data.augment": False}},
        seeds=(0, 1, 2),
        overrides={"metrics.tensorboard": False},
    )
