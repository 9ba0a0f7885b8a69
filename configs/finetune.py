"""Fine-tune a trained or imported run: its model and data settings, started from its latest
checkpoint, with a fine-tuning schedule (short warmup, lower peak, cosine to 10 %).

  bigjax train --config configs/finetune.py:runs/imported --workdir runs/ft \
      --config.finetune.lora_rank=8 \
      --config.data.task=sft --config.data.examples=pairs.jsonl --config.data.packing=first_fit
"""

import json
from pathlib import Path

import ml_collections


def get_config(arg=None):
    if not arg:
        raise ValueError("configs/finetune.py needs the run to start from: finetune.py:RUN_DIR")
    run = json.loads((Path(arg) / "config.json").read_text())
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 500
    c.model = run["model"]
    c.data = run["data"]
    c.optim = dict(name="adamw", lr=1e-4, schedule="cosine", warmup_steps=20, weight_decay=0.0)
    c.checkpoint = dict(init_from=str(arg), every_steps=100, keep=2)
    c.eval = dict(every_steps=100, num_batches=4)
    return c
