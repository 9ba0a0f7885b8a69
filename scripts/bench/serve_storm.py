"""A storm of concurrent clients against `bigjax serve`: how many get their answer.

    python scripts/bench/serve_storm.py RUN [--clients 200,500] [--max-waiting 64,256]
        [--slots 8] [--runs 3] [--max-tokens 32] [--hang-up 0.3]

For each --max-waiting a server of RUN is started in a subprocess (`--slots` decode slots);
then, --runs times, --clients clients of the `openai` package (AsyncOpenAI, its default 2
retries, which follow a 429's `retry-after-ms`) all ask at once for a streamed chat
completion of --max-tokens tokens; a --hang-up share of them close their stream after 3
chunks, as a user who stops reading does. Each line: the clients that got their answer (or
hung up as planned), the ones refused after their retries (429), any other error, and the
seconds the storm took. A server's first storm comes before any sequence has finished, so
its 429s guess a second per sequence; the runs after use the measured time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import time

import httpx
import openai

KEY = "sk-storm"


async def storm(base_url: str, clients: int, max_tokens: int, hang_up: float) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, timeout=600)
    outcome: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        try:
            stream = await client.chat.completions.create(
                model="run", messages=[{"role": "user", "content": f"question {i}"}],
                stream=True, max_tokens=max_tokens, seed=i,
            )  # fmt: skip
            chunks = 0
            async for _ in stream:
                chunks += 1
                if i < clients * hang_up and chunks == 3:
                    break
            await stream.close()
            outcome["answered"] += 1
        except openai.RateLimitError:
            outcome["refused"] += 1
        except openai.OpenAIError as e:
            outcome[f"other: {type(e).__name__}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    await client.close()
    return {**outcome, "seconds": round(time.perf_counter() - started, 1)}


def serve(run: str, slots: int, max_waiting: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bigjax.cli", "serve", run, "--port", str(port),
           "--slots", str(slots), "--max-waiting", str(max_waiting), "--api-key", KEY,
           "--served-model-name", "run"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"the server did not start: {proc.stderr.read() if proc.stderr else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--clients", default="200,500")
    ap.add_argument("--max-waiting", default="64,256")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hang-up", type=float, default=0.3)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    for max_waiting in (int(w) for w in args.max_waiting.split(",")):
        proc = serve(args.run, args.slots, max_waiting, args.port)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                for r in range(args.runs):
                    got = asyncio.run(storm(f"http://127.0.0.1:{args.port}/v1", clients,
                                            args.max_tokens, args.hang_up))  # fmt: skip
                    print(f"--max-waiting {max_waiting}, {clients} clients, run {r + 1}: {got}",
                          flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
