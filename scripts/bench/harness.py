"""lm-evaluation-harness in bigjax against lm-eval's own Hugging Face backend, on one model.

    python scripts/bench/harness.py [--items 400] [--runs 3] [--out results.json]

A Llama-shaped transformers model (random weights; d 256, 4 layers, vocabulary = bytes +
3 specials) is saved with a byte-level tokenizer whose ids are bigjax's byte tokenizer's, and
imported with `bigjax convert`. Two tasks are written over standard-library text: a
multiple-choice task (--items items: a line of code and four candidate next lines) and a
perplexity task (--items // 4 documents). Then, as whole processes, --runs times each:

    bigjax eval RUN --tasks bench_mc,bench_ppl --include-path TASKS
    lm_eval --model hf --model_args pretrained=HF,dtype=float32 --tasks ... --include_path TASKS

and the table shows both accuracies and perplexities (they must agree: the same weights and
ids), the median wall time of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what a byte-level tokenizer's vocab holds)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_hf_model(out: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|endoftext|>", "<|pad|>"])  # 256, 257, 258
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=259, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)


def write_tasks(out: Path, items: int) -> None:
    rng = random.Random(0)
    lines = [
        line
        for f in sorted((STDLIB / "json").glob("*.py")) + [STDLIB / "textwrap.py"]
        for line in f.read_text().splitlines()
        if 8 < len(line) < 80
    ]
    with (out / "mc.jsonl").open("w") as f:
        for _ in range(items):
            i = rng.randrange(len(lines) - 1)
            # four different lines: two equal choices would tie, and each harness breaks a
            # tie its own way
            others = [x for x in dict.fromkeys(rng.sample(lines, 8)) if x != lines[i + 1]]
            choices = [lines[i + 1], *others[:3]]
            f.write(
                json.dumps({"context": lines[i] + "\n", "choices": choices, "answer": 0}) + "\n"
            )
    with (out / "ppl.jsonl").open("w") as f:
        for _ in range(max(items // 4, 1)):
            i = rng.randrange(len(lines) - 8)
            f.write(json.dumps({"text": "\n".join(lines[i : i + 6])}) + "\n")
    (out / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {out / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (out / "bench_ppl.yaml").write_text(
        "task: bench_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {out / 'ppl.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"{cmd[:4]} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for d in ("hf", "tasks", "hfcache"):
            (t / d).mkdir()
        write_hf_model(t / "hf")
        write_tasks(t / "tasks", args.items)
        env = {**os.environ, "HF_HOME": str(t / "hfcache"), "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
        convert = [sys.executable, "-m", "bigjax.cli", "convert", str(t / "hf"), str(t / "run")]
        subprocess.run(convert, check=True, stdout=subprocess.DEVNULL, env=env)
        tasks = "bench_mc,bench_ppl"
        ours = [sys.executable, "-m", "bigjax.cli", "eval", str(t / "run"), "--tasks", tasks,
                "--include-path", str(t / "tasks"), "--json", str(t / "ours.json")]  # fmt: skip
        theirs = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                  f"pretrained={t / 'hf'},dtype=float32", "--device", "cpu", "--tasks", tasks,
                  "--include_path", str(t / "tasks"), "--batch_size", "16",
                  "--output_path", str(t / "theirs")]  # fmt: skip
        times: dict[str, list[float]] = {"bigjax": [], "hf": []}
        for _ in range(args.runs):  # interleaved: drift in the machine's speed hits both
            times["bigjax"].append(timed(ours, env))
            times["hf"].append(timed(theirs, env))
        a = json.loads((t / "ours.json").read_text())["results"]
        b = json.loads(next((t / "theirs").rglob("results_*.json")).read_text())["results"]
    row = {
        "bigjax": {"acc": a["bench_mc"]["acc,none"], "ppl": a["bench_ppl"]["word_perplexity,none"],
                   "median_s": statistics.median(times["bigjax"]), "runs_s": times["bigjax"]},
        "hf": {"acc": b["bench_mc"]["acc,none"], "ppl": b["bench_ppl"]["word_perplexity,none"],
               "median_s": statistics.median(times["hf"]), "runs_s": times["hf"]},
    }  # fmt: skip
    print(f"{args.items} multiple-choice items x 4 choices, {max(args.items // 4, 1)} perplexity "
          f"documents; median of {args.runs} whole-process runs\n")  # fmt: skip
    print("| backend | acc | word perplexity | wall (median) |")
    print("|---|---|---|---|")
    for name, r in row.items():
        print(f"| {name} | {r['acc']:.4f} | {r['ppl']:.4f} | {r['median_s']:.1f} s |")
    print(f"\nbigjax in process: {row['hf']['median_s'] / row['bigjax']['median_s']:.2f}x faster "
          "than lm-eval's hf backend")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
