"""Hugging Face `transformers` Llama trained with `torch.compile`: the PyTorch peer on a GPU.

`LlamaForCausalLM` built from a config of the shared shape (random weights, nothing
downloaded), SDPA attention (flash on CUDA), bf16 autocast over f32 master weights, fused
AdamW with clipping, `torch.compile` of the model. The batch is synthetic and resident.

    python scripts/bench/peers/hf_llama.py --size 1b --steps 10 --warmup 3 [--no-compile]

Prints one JSON line: {"peer": "hf torch.compile", "step_times_s": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from shapes import SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    s = SHAPES[args.size]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["d"],
        intermediate_size=s["ff"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["seq"],
        rope_theta=s["theta"],
        tie_word_embeddings=s["tied"],
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda
    )
    forward = model if args.no_compile else torch.compile(model)
    tokens = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), device=device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = forward(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, s["vocab"]), labels.view(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device

    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    name = "hf torch eager" if args.no_compile else "hf torch.compile"
    record = {"peer": name, "step_times_s": times, "compile_s": compile_s, "loss": loss,
              "tokens_per_step": s["batch"] * s["seq"], "torch": torch.__version__}  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
