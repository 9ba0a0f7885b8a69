"""`bigjax prepare`: its flags, and the call into bigjax.data.prepare."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from bigjax.cli.common import add_command
from bigjax.config import ConfigError


def cmd_prepare(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """clean, deduplicate, scrub and tokenize a corpus

    Turn raw text (.txt/.md/.py files, .jsonl[.gz|.zst], .parquet, or 'stdlib') into a
    prepared dataset: ArrayRecord token shards, tokenizer/, manifest.json and report.md.
    """
    if overrides:
        raise ConfigError("prepare takes no --config.* overrides; see bigjax prepare --help.")
    from bigjax.data.clean import QualityConfig
    from bigjax.data.prepare import PrepareConfig, prepare

    quality = None
    if not args.no_quality:
        quality = QualityConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(QualityConfig)}
        )
    prepare(
        PrepareConfig(
            inputs=tuple(args.input),
            output=args.output,
            tokenizer=args.tokenizer,
            text_field=args.text_field,
            normalize=not args.no_normalize,
            invalid_utf8=args.invalid_utf8,
            quality=quality,
            exact_dedup=not args.no_exact_dedup,
            near_dedup=not args.no_near_dedup,
            near_threshold=args.near_threshold,
            num_perm=args.num_perm,
            pii=not args.no_pii,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            strict=args.strict,
            max_record_bytes=args.max_record_bytes,
            languages=tuple(args.languages or ()),
            workers=args.workers,
        )
    )
    return 0


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    from bigjax.data.clean import NEAR_THRESHOLD, QualityConfig

    p = add_command(sub, cmd_prepare)
    p.add_argument("--input", nargs="+", required=True, help="globs, folders, or 'stdlib'")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="byte | bpe:VOCAB | sentencepiece:PATH | hf:PATH (default: byte)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--shard-tokens", type=int, default=64 * 2**20)
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unusable record instead of skipping and counting it",
    )
    p.add_argument("--invalid-utf8", choices=("repair", "drop"), default="repair")
    p.add_argument(
        "--max-record-bytes",
        type=int,
        default=32 << 20,
        help="a longer JSONL line or text file is skipped (counted too_large) as it is read, "
        "never held in memory (default 32 MiB)",
    )
    p.add_argument(
        "--near-threshold",
        type=float,
        default=NEAR_THRESHOLD,
        help="Jaccard of 5-unit shingles above which a document is a near duplicate",
    )
    p.add_argument(
        "--languages",
        nargs="+",
        metavar="CODE",
        help="keep only documents in these languages (ISO 639-1 tags as in the report: zh en)",
    )
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    for stage in ("normalize", "quality", "exact-dedup", "near-dedup", "pii"):
        p.add_argument(f"--no-{stage}", action="store_true", help=f"switch off {stage}")
    for f in dataclasses.fields(QualityConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=type(f.default),
            default=f.default,
            help=f"quality filter (default {f.default})",
        )
