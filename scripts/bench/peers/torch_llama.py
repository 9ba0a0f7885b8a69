"""The same Llama model and training step in PyTorch, written nanoGPT-style (one file, one
module, `F.scaled_dot_product_attention`, fused AdamW where available).

    python scripts/bench/peers/torch_llama.py [--compile] [--bf16] --steps 5 --warmup 2

`--compile` wraps the model in `torch.compile` (Inductor, C++ on CPU); `--bf16` runs the
forward under bfloat16 autocast with f32 master weights. The batch is synthetic and resident.
Prints one JSON line: {"peer": "torch ...", "step_times_s": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

D, LAYERS, HEADS, FF, VOCAB, SEQ, BATCH = 512, 8, 8, 2048, 32000, 256, 8
K = D // HEADS


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale).to(
            x.dtype
        )


def rope(x, cos, sin):  # x: [B, H, L, K], rotate-half layout
    x1, x2 = x[..., : K // 2], x[..., K // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(D), RMSNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.gate_up = nn.Linear(D, 2 * FF, bias=False)
        self.down = nn.Linear(FF, D, bias=False)

    def forward(self, x, cos, sin, mask):
        b, length, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(D, dim=-1)
        q, k, v = (t.view(b, length, HEADS, K).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(y.transpose(1, 2).reshape(b, length, D))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        half = K // 2
        freq = 1.0 / 10000.0 ** (torch.arange(half) / half)
        angle = torch.arange(SEQ)[:, None] * freq
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, tokens, targets, segment_ids, weights):
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        mask = (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin, mask)
        logits = self.head(self.norm(x)).float()
        nll = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), reduction="none")
        return (nll * weights.view(-1)).sum() / weights.sum().clamp(min=1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    model = Llama()
    for p in model.parameters():
        if p.ndim >= 2:
            nn.init.trunc_normal_(p, std=1 / math.sqrt(p.shape[-1]), a=-2, b=2)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    forward = torch.compile(model) if args.compile else model

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    segment_ids = torch.ones(BATCH, SEQ, dtype=torch.int32)
    weights = torch.ones(BATCH, SEQ)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward(inputs, targets, segment_ids, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    start = time.perf_counter()
    step()  # eager: the first step; compiled: the compile, included in compile_s
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    name = f"torch {'compile' if args.compile else 'eager'} {'bf16' if args.bf16 else 'f32'}"
    print(
        json.dumps(
            {
                "peer": name,
                "step_times_s": times,
                "compile_s": compile_s,
                "tokens_per_step": BATCH * SEQ,
                "loss": loss,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
