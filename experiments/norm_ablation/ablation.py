"""Does lm_tiny train better with LayerNorm instead of RMSNorm, or with tied embeddings?
Baseline and two variants, 3 seeds each, identical data order (data.seed fixed).

    bigjax sweep experiments/norm_ablation/ablation.py
    bigjax report runs/sweeps/norm_ablation --out experiments/norm_ablation/results
"""

from bigjax.sweep import ablation


def get_sweep():
    return ablation(
        "norm_ablation",
        "configs/lm_tiny.py",
        {
            "layernorm": {"model.norm": "layernorm"},
            "tied_embeddings": {"model.tie_embeddings": True},
        },
        seeds=(0, 1, 2),
        overrides={"eval.every_steps": 50, "metrics.tensorboard": False},
    )
