"""A size ladder on the built-in corpus for a compute scaling-law fit L(C) = a C^-b + c.

Five widths of lm_tiny's 2-layer shape, each trained on 4 tokens per parameter, so compute
(~6 N D) spans ~50x. Small and short on purpose (this runs on a 2-core CPU): the point is
the workflow, not the constants.

    bigjax sweep experiments/scaling_ladder/sweep.py
    bigjax report runs/sweeps/scaling_ladder --fit scaling --out experiments/scaling_ladder/results
"""

from bigjax.config import from_configdict
from bigjax.models.llama import param_count
from bigjax.sweep import ladder

BATCH, SEQ = 16, 256


def count(model_overrides):
    model = {"size": "tiny", **{k.split(".", 1)[1]: v for k, v in model_overrides.items()}}
    return param_count(from_configdict({"model": model}).model)


def get_sweep():
    sizes = {
        f"d{d}": {"model.d_model": d, "model.d_ff": 3 * d, "model.num_heads": max(d // 32, 1),
                  "model.num_kv_heads": max(d // 64, 1)}
        for d in (32, 48, 64, 96, 128)
    }  # fmt: skip
    return ladder(
        "scaling_ladder",
        "configs/lm_tiny.py",
        sizes,
        tokens_per_param=4,
        tokens_per_step=BATCH * SEQ,
        param_count=count,
        overrides={
            "data.batch_size": BATCH,
            "data.seq_len": SEQ,
            "optim.warmup_steps": 10,
            "eval.every_steps": 0,
            "eval.num_batches": 8,
            "metrics.tensorboard": False,
        },
    )
