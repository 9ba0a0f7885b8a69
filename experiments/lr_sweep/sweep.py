"""Which peak learning rate trains lm_tiny best in its 300 steps (AdamW, cosine, warmup 30)?

bigjax sweep experiments/lr_sweep/sweep.py
bigjax report runs/sweeps/lr_sweep --out experiments/lr_sweep/results
"""

from bigjax.sweep import Grid, Sweep


def get_sweep():
    return Sweep(
        name="lr_sweep",
        config="configs/lm_tiny.py",
        space={"optim.lr": Grid((3e-4, 1e-3, 3e-3, 1e-2, 3e-2))},
        overrides={"eval.every_steps": 50, "metrics.tensorboard": False},
    )
