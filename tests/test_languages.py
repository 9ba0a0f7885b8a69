"""Data preparation in every language: the shipped Chinese, Japanese, Arabic, Hindi, Russian,
Korean and Thai fixtures pass the default filters and are tagged right; the filters still drop
boilerplate, gibberish and symbol soup in each script; Unicode is repaired; near dedup works
without spaces."""

import json
import random
from pathlib import Path

import pytest

from bigjax.data import language
from bigjax.data.clean import QualityConfig, normalize, quality_reason
from bigjax.data.prepare import PrepareConfig, prepare
from bigjax.data.sources import DataError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "languages"
LANGS = ("zh", "ja", "ar", "hi", "ru", "ko", "th")
# Letters of each script, for generated gibberish (random letters in word-like runs).
ALPHABETS = {
    "zh": "".join(chr(c) for c in range(0x4E00, 0x9FA5, 7)),
    "ja": "".join(chr(c) for c in range(0x4E00, 0x9FA5, 11)),
    "ar": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "hi": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह",
    "ru": "абвгдежзийклмнопрстуфхцчшщыэюя",
    "ko": "".join(chr(c) for c in range(0xAC00, 0xD7A3, 13)),
    "th": "กขคฆงจฉชซฌญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮ",
    "en": "abcdefghijklmnopqrstuvwxyz",
}
UNSEGMENTED = {"zh", "ja", "th"}


def documents(lang: str) -> list[str]:
    return [d.strip() for d in (FIXTURES / f"{lang}.txt").read_text().split("\n===\n")]


def gibberish(lang: str, rng: random.Random) -> str:
    letters = ALPHABETS[lang]
    if lang in UNSEGMENTED:
        return "".join(rng.choice(letters) for _ in range(400))
    words = ("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(120))
    return " ".join(words)


@pytest.mark.parametrize("lang", LANGS)
def test_real_text_passes_the_default_filters_and_gets_its_language(lang):
    for doc in documents(lang):
        assert quality_reason(normalize(doc), QualityConfig()) is None, doc
    # the identifier is sure on paragraphs; a one-line note may go to a neighbour
    tags = [language.identify(d) for d in documents(lang)]
    assert sum(t == lang for t in tags) >= len(tags) - 1, tags


@pytest.mark.parametrize("lang", LANGS + ("en",))
def test_filters_still_drop_boilerplate_gibberish_and_symbol_soup_in_each_script(lang):
    rng = random.Random(0)
    line = documents(lang)[0].split("\n")[0] if lang != "en" else "Subscribe to our newsletter!"
    sentence = line[:40]
    boilerplate = "\n".join([sentence] * 12 + ["© 2024"])
    soup = " ".join(rng.choice("#$%&*+=<>|~^{}[]0123456789") * 3 for _ in range(60)) + sentence[:5]
    assert quality_reason(boilerplate, QualityConfig()) == "duplicate_lines"
    assert quality_reason(gibberish(lang, rng), QualityConfig()) in (
        "no_function_words",
        "mean_word_length",
    )
    assert quality_reason(soup, QualityConfig()) == "low_alpha_fraction"
    spam = (sentence[:6] + " ") * 40 if lang not in UNSEGMENTED else sentence[:4] * 60
    assert quality_reason(spam, QualityConfig()) in ("repeated_ngrams", "duplicate_lines")


def test_units_count_characters_only_in_unsegmented_scripts():
    assert language.units("机器学习 is fun") == ["机", "器", "学", "习", "is", "fun"]
    assert language.units("Машинное обучение") == ["Машинное", "обучение"]
    assert language.units("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay in the word
    assert language.is_letter("ि") and not "ि".isalpha()


def test_unicode_is_repaired_and_normalised_but_content_kept():
    assert normalize("CafÃ© â€“ naÃ¯ve") == "Café – naïve"  # UTF-8 read as Windows-1252
    assert normalize("Cafe\u0301") == "Café"  # NFC
    kept = "“quoted” ﬁne　全角，标点！ &amp; x"  # curly quotes, ligature, CJK full-width, entity
    assert normalize(kept) == kept


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return path


@pytest.mark.slow
def test_prepare_keeps_every_fixture_document_and_reports_languages(tmp_path):
    texts = [d for lang in LANGS for d in documents(lang)]
    _jsonl(tmp_path / "multi.jsonl", texts)
    m = prepare(
        PrepareConfig(
            inputs=(str(tmp_path / "multi.jsonl"),), output=str(tmp_path / "ds"), workers=2
        )
    )
    assert m["documents_in"] == m["documents_out"] == len(texts), m["filtered"]
    assert sum(m["pii"].values()) == 0  # nothing in clean prose looks like personal data
    for lang in LANGS:
        assert m["languages"].get(lang, 0) >= len(documents(lang)) - 1, m["languages"]
    assert "| zh |" in (tmp_path / "ds" / "report.md").read_text()

    m = prepare(
        PrepareConfig(
            inputs=(str(tmp_path / "multi.jsonl"),),
            output=str(tmp_path / "zh"),
            languages=("zh", "ja"),
            workers=1,
        )
    )
    assert set(m["languages"]) <= {"zh", "ja"} and m["filtered"]["language"] > 20
    assert m["documents_out"] >= len(documents("zh")) + len(documents("ja")) - 2
    with pytest.raises(DataError, match="--languages chinese: not a tag"):
        prepare(
            PrepareConfig(
                inputs=(str(tmp_path / "multi.jsonl"),),
                output=str(tmp_path / "x"),
                languages=("chinese",),
            )
        )


def test_near_duplicates_are_found_in_text_without_spaces(tmp_path):
    zh = documents("zh")
    original = zh[0] + zh[2]
    edited = original.replace("经济", "金融", 1)  # two characters of ~250 changed
    _jsonl(tmp_path / "zh.jsonl", [original, edited, zh[1]])
    cfg = PrepareConfig(
        inputs=(str(tmp_path / "zh.jsonl"),), output=str(tmp_path / "ds"), workers=1
    )
    m = prepare(cfg)
    assert m["dedup"] == {"exact": 0, "near": 1} and m["documents_out"] == 2
