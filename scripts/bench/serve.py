"""Serving throughput and latency: continuous batching against one request at a time.

    python scripts/bench/serve.py [--configs lm_tiny,lm_small] [--clients 8] [--requests 48]
        [--rate 0] [--max-tokens 64] [--runs 3] [--out results.json]

For each config a run is trained for one step (the weights do not change the speed), then
served twice by `bigjax serve` in a subprocess on this machine's devices: with --slots equal
to --clients (continuous batching) and with --slots 1 (one request at a time, the rest
queued). Each time --requests streamed completions arrive with Poisson inter-arrival times at
--rate requests/s (0: all at once), at most --clients in flight; every request asks for
--max-tokens tokens (ignore_eos, so every request does the same work) after a prompt of
16-120 bytes of standard-library text. Both servers stay up and the modes alternate, --runs
times (drift in the machine's speed hits both); the table shows each mode's median run by
throughput: output tokens/s over the whole run, time to first token (TTFT) and time per
output token after the first (TPOT) at p50/p90/p99, and the ratio of the two modes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def prompts(n: int, seed: int = 0) -> list[str]:
    text = (STDLIB / "json" / "decoder.py").read_text() + (STDLIB / "textwrap.py").read_text()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(text) - 200), rng.randrange(16, 120)
        out.append(text[start : start + length])
    return out


def train(config: str, workdir: Path) -> None:
    cmd = [sys.executable, "-m", "bigjax.cli", "train", "--config", f"configs/{config}.py",
           "--workdir", str(workdir), "--config.num_steps=1", "--config.eval.num_batches=1",
           "--config.metrics.tensorboard=false", "--config.metrics.plot=false"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def serve(workdir: Path, slots: int, waiting: int) -> tuple[str, subprocess.Popen]:
    cmd = [sys.executable, "-m", "bigjax.cli", "serve", str(workdir), "--port", "0",
           "--slots", str(slots), "--max-waiting", str(waiting)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"on (http://[\d.]+:\d+)/v1", line)
    if not match:
        raise RuntimeError(line + proc.stdout.read())  # type: ignore[union-attr]
    url = match.group(1)
    while httpx.get(f"{url}/health").status_code != 200:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())  # type: ignore[union-attr]
        time.sleep(0.2)
    return url, proc


async def drive(url: str, texts: list[str], clients: int, rate: float, max_tokens: int) -> dict:
    rng = random.Random(1)
    gate = asyncio.Semaphore(clients)
    ttft, tpot, tokens = [], [], 0

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        nonlocal tokens
        async with gate:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            start = time.perf_counter()
            stamps = []
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.perf_counter())
            # chunks carry text as it completes whole characters: the usage count is exact
            tokens += max_tokens
            ttft.append(stamps[0] - start)
            if len(stamps) > 1:
                tpot.append((stamps[-1] - stamps[0]) / (max_tokens - 1))

    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for p in texts:
            tasks.append(asyncio.create_task(one(client, p)))
            if rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "ttft": pct(ttft), "tpot": pct(tpot)}


def pct(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="lm_tiny,lm_small")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (Poisson); 0: at once")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="runs of each mode; the median is shown")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    texts = prompts(args.requests)
    results = {}
    modes = {"continuous": args.clients, "one at a time": 1}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            run = Path(tmp) / config
            train(config, run)
            servers = {
                mode: serve(run, slots, waiting=args.requests) for mode, slots in modes.items()
            }
            try:
                runs: dict[str, list[dict]] = {mode: [] for mode in modes}
                for url, _ in servers.values():
                    asyncio.run(drive(url, texts[:4], args.clients, 0, 4))  # warm connections
                for _ in range(args.runs):
                    for mode, (url, _) in servers.items():
                        r = asyncio.run(drive(url, texts, args.clients, args.rate, args.max_tokens))
                        runs[mode].append(r)
                for mode, rs in runs.items():
                    by_speed = sorted(rs, key=lambda r: r["tokens_per_s"])
                    speeds = [r["tokens_per_s"] for r in rs]
                    results[(config, mode)] = {**by_speed[len(rs) // 2], "runs": speeds}
            finally:
                for _, proc in servers.values():
                    proc.terminate()
                    proc.wait()
    print(f"{args.requests} requests x {args.max_tokens} tokens, {args.clients} clients, "
          f"rate {args.rate or 'all at once'}; {os.cpu_count()} CPUs; median of {args.runs} "
          "runs\n")  # fmt: skip
    print(
        "| config | mode | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) |"
    )
    print("|---|---|---|---|---|")
    for (config, mode), r in results.items():
        t, p = r["ttft"], r["tpot"]
        print(f"| {config} | {mode} | {r['tokens_per_s']:.1f} | "
              f"{t['p50'] * 1e3:.0f} / {t['p90'] * 1e3:.0f} / {t['p99'] * 1e3:.0f} | "
              f"{p['p50'] * 1e3:.1f} / {p['p90'] * 1e3:.1f} / {p['p99'] * 1e3:.1f} |")  # fmt: skip
    for config in args.configs.split(","):
        c, o = results[(config, "continuous")], results[(config, "one at a time")]
        print(f"\n{config}: continuous batching {c['tokens_per_s'] / o['tokens_per_s']:.2f}x the "
              f"throughput; p50 TTFT {c['ttft']['p50'] / o['ttft']['p50']:.2f}x")  # fmt: skip
    if args.out:
        Path(args.out).write_text(
            json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, indent=2)
        )


if __name__ == "__main__":
    main()
