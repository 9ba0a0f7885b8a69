"""Unicode repair, normalisation and heuristic quality filters, one document at a time.

The filters are Gopher-style but count in units that mean the same in every script (see
bigjax/data/language.py): a Chinese, Japanese or Thai character is one unit, any other
whitespace-separated run is one; letters include their combining marks (Devanagari vowel
signs); gibberish is caught by its lack of function words, per writing system.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import unicodedata
from typing import Any, TypedDict

from bigjax.data import language

# C0/C1 control characters except tab and newline; also zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")
_WORD = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality filters; a document failing one is dropped and counted.

    Defaults keep ~97% of real Python source and every document of the multilingual fixtures
    while dropping boilerplate, gibberish and symbol soup in each script (docs/data.md has the
    measurements they were chosen from).
    """

    min_chars: int = 32  # an unsegmented-script character counts 3 (it carries a word's worth)
    max_chars: int = 2_000_000
    min_alpha_frac: float = 0.25  # letters (with their marks) / non-whitespace characters
    max_dup_line_frac: float = 0.5  # duplicated non-empty lines / non-empty lines
    max_repeated_ngram_frac: float = 0.6  # repeated unit 3-grams / all unit 3-grams
    min_mean_word_len: float = 2.0  # characters per word, in segmented scripts only
    max_mean_word_len: float = 20.0
    min_function_word_frac: float = 0.01  # function words / words, in scripts with a list


@functools.cache
def _fixer_config() -> Any:  # ftfy.TextFixerConfig, imported lazily
    import ftfy

    # Only repairs: mojibake, lossy or inconsistent UTF-8, C1 controls, terminal escapes, then
    # NFC. Curly quotes, ligatures, full-width CJK forms and HTML entities are content (and
    # code), so they are left as written.
    return ftfy.TextFixerConfig(
        unescape_html=False,
        fix_latin_ligatures=False,
        fix_character_width=False,
        uncurl_quotes=False,
        normalization="NFC",
        explain=False,
    )


def repair(text: str) -> str:
    """Mojibake and other Unicode damage undone by ftfy, then NFC."""
    import ftfy

    return ftfy.fix_text(text, _fixer_config())


def normalize(text: str) -> str:
    """Repaired mojibake (ftfy), NFC, no control characters, '\\n' line ends, no trailing
    spaces, at most 3 blank lines. Indentation is kept: it is meaning in code."""
    return normalize_counted(text)[0]


def normalize_counted(text: str) -> tuple[str, bool]:
    """`normalize`, and whether ftfy repaired more than the NFC form would (mojibake)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    fixed = repair(text)
    return tidy(fixed), fixed != unicodedata.normalize("NFC", text)


def tidy(text: str) -> str:
    """No control characters, no trailing spaces, at most 3 blank lines (after `repair`)."""
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("", text)
    return _MANY_BLANK_LINES.sub("\n\n\n", text).strip("\n")


def effective_length(text: str) -> int:
    """Characters, with each unsegmented-script character counted 3 (as in UTF-8 bytes)."""
    return len(text) + 2 * language.unsegmented_chars(text)


class QualityStats(TypedDict):
    chars: int
    alpha_frac: float
    dup_line_frac: float
    repeated_ngram_frac: float
    mean_word_len: float | None
    function_word_frac: float | None


def quality_stats(text: str) -> QualityStats:
    """The quantities the filters look at (also used to tune thresholds on a corpus).
    None: the measure does not apply to this text's script."""
    non_ws = sum(1 for c in text if not c.isspace())
    letters = sum(1 for c in text if language.is_letter(c))
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    units = language.units(text)
    grams = list(zip(units, units[1:], units[2:], strict=False))
    gram_counts = collections.Counter(grams)
    # Word length is a property of segmented scripts; in Chinese a "word" between spaces is
    # a sentence. Measured only where most units are whitespace-separated words.
    words = [w for w in _WORD.findall(text) if not language.unsegmented_chars(w)]
    segmented = len(words) >= len(units) / 2
    return {
        "chars": effective_length(text),
        "alpha_frac": letters / max(non_ws, 1),
        "dup_line_frac": (len(lines) - len(set(lines))) / max(len(lines), 1),
        "repeated_ngram_frac": (len(grams) - len(gram_counts)) / max(len(grams), 1),
        "mean_word_len": sum(map(len, words)) / max(len(words), 1) if segmented else None,
        "function_word_frac": language.function_word_frac(text),
    }


def quality_reason(text: str, cfg: QualityConfig) -> str | None:
    """The first filter `text` fails, or None when it passes them all."""
    if effective_length(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    s = quality_stats(text)
    if s["alpha_frac"] < cfg.min_alpha_frac:
        return "low_alpha_fraction"
    if s["dup_line_frac"] > cfg.max_dup_line_frac:
        return "duplicate_lines"
    if s["repeated_ngram_frac"] > cfg.max_repeated_ngram_frac:
        return "repeated_ngrams"
    word_len = s["mean_word_len"]
    if word_len is not None and not cfg.min_mean_word_len <= word_len <= cfg.max_mean_word_len:
        return "mean_word_length"
    function = s["function_word_frac"]
    if function is not None and function < cfg.min_function_word_frac:
        return "no_function_words"
    return None


# Near-duplicate threshold on the Jaccard similarity of 5-unit shingles, chosen from the recall
# table in docs/data.md (scripts/data/quality_tables.py near-dup): at 0.6 every copy with 1 % or
# 3 % of its words changed is caught (0.8 catches 11 % of the 3 % ones), copies with 10 %
# changed (Jaccard ~0.42) are kept as revisions, and the only distinct stdlib modules merged are
# machine-generated codec tables that share 60-85 % of their shingles.
NEAR_THRESHOLD = 0.6


def dedup_key(text: str) -> str:
    """Text as exact dedup compares it: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())
