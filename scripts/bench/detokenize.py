"""Streaming detokenization: the host time per generated token, side by side.

    python scripts/bench/detokenize.py [--lengths 256,2048,8192] [--runs 5]

What `bigjax serve` spends on the host for each token of each sequence, turning ids into the
text a client reads. Peers, in one process, on the same ids:
  bigjax          serving.text.Detokenizer: a window of ids decoded per token, stop strings
  decode-all      decoding the whole list at every token (bigjax's detokenizer before the
                  window; what a naive streamer does)
  DecodeStream    Hugging Face tokenizers' own incremental decoder (Rust; no stop strings),
                  for the BPE tokenizer only
Ids: standard-library text encoded by a byte tokenizer and by a BPE tokenizer of 4,096 ids
trained on it, cut to each length. The table is the median over --runs of microseconds per
token over the whole sequence, and each peer's time over bigjax's. Then the same for the
`text_offset` field (where each token starts in the text) of an echoed prompt, computed
incrementally against a decode per token.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from bigjax.data import tokenizer as tk
from bigjax.serving.text import Detokenizer


def bigjax_stream(tok: tk.Tokenizer, ids: list[int]) -> str:
    det = Detokenizer(tok, stop=("\n\n\n\n\n",))
    return "".join(det.add(i) for i in ids) + det.flush()


def decode_all(tok: tk.Tokenizer, ids: list[int]) -> str:
    sent = ""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n]).rstrip("\ufffd")
        sent += text[len(sent) :]
    return tok.decode(ids)


def decode_stream(tok: tk.Tokenizer, ids: list[int]) -> str:
    from tokenizers.decoders import DecodeStream

    stream, hf = DecodeStream(skip_special_tokens=False), tok._tok  # type: ignore[attr-defined]
    return "".join(piece or "" for i in ids if (piece := stream.step(hf, i)) is not None)


def offsets_bigjax(tok: tk.Tokenizer, ids: list[int]) -> list[int]:
    from bigjax.serving.bodies import Choice

    choice = Choice(index=0, seq=None, det=None, echo=True, ids=ids)  # type: ignore[arg-type]
    return choice.text_offsets(tok, 0, len(ids))


def offsets_decode_all(tok: tk.Tokenizer, ids: list[int]) -> list[int]:
    return [len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def per_token_us(fn: Callable, tok: tk.Tokenizer, ids: list[int]) -> float:
    start = time.perf_counter()
    fn(tok, ids)
    return (time.perf_counter() - start) / len(ids) * 1e6


def medians(peers: dict[str, Callable], tok: tk.Tokenizer, ids: list[int],
            runs: int) -> dict[str, float]:  # fmt: skip
    """Each peer's median µs per token over `runs`, the peers alternating within each run."""
    times: dict[str, list[float]] = {p: [] for p in peers}
    for _ in range(runs):
        for p, fn in peers.items():
            times[p].append(per_token_us(fn, tok, ids))
    return {p: statistics.median(t) for p, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="256,2048,8192")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / f).read_text() for f in ("textwrap.py", "json/decoder.py"))
    text = (text * (1 + 40_000 // len(text)))[: max(lengths) * 8]
    tokenizers = {"byte": tk.ByteTokenizer(), "bpe": tk.train_bpe([text], 4096)}
    cases = [(name, tok, [int(i) for i in tok.encode(text)][:n])
             for name, tok in tokenizers.items() for n in lengths]  # fmt: skip
    print("| tokenizer | tokens | bigjax µs/token | decode-all | DecodeStream |")
    print("|---|---|---|---|---|")
    for name, tok, ids in cases:
        peers: dict[str, Callable] = {"bigjax": bigjax_stream, "decode-all": decode_all}
        if name == "bpe":
            peers["DecodeStream"] = decode_stream
        for fn in peers.values():  # every peer writes the same text
            assert fn(tok, ids) == tok.decode(ids), fn.__name__
        med = medians(peers, tok, ids, args.runs)
        cells = [f"{med[p]:.1f} ({med[p] / med['bigjax']:.2f}x)" if p in med else "-"
                 for p in ("decode-all", "DecodeStream")]  # fmt: skip
        print(
            f"| {name} | {len(ids)} | {med['bigjax']:.1f} | {cells[0]} | {cells[1]} |", flush=True
        )
    print("\n`text_offset` of an echoed prompt (completions with logprobs), µs per token:\n")
    print("| tokenizer | tokens | bigjax | decode-all |\n|---|---|---|---|")
    for name, tok, ids in cases:
        assert offsets_bigjax(tok, ids) == offsets_decode_all(tok, ids)
        med = medians({"bigjax": offsets_bigjax, "decode-all": offsets_decode_all}, tok, ids,
                      args.runs)  # fmt: skip
        b, d = med["bigjax"], med["decode-all"]
        print(f"| {name} | {len(ids)} | {b:.1f} | {d:.1f} ({d / b:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
