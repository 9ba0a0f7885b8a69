"""Scripts, words and languages: what the quality filters and near dedup count, in any script.

Whitespace is not a word boundary in every script: Chinese, Japanese, Thai, Lao, Khmer,
Myanmar and Tibetan run words together. Here a character of such a script is one unit (the
way Chinese NLP counts), every other whitespace-separated run is one unit, so "words" mean the
same thing for English, Russian or Arabic as before and something sensible for Chinese.

Gibberish (random letters of a script, keyboard mashing) has the length, letters and variety of
real text; what it lacks is the small set of function words every natural language is made
of. `function_word_frac` measures them per script (one list per writing system, the union of its
major languages' most frequent words, so a misidentified language cannot fail a document).

Language tags come from py3langid (langid.py's model, 97 languages, shipped inside its wheel:
nothing is downloaded), on the first 4,000 characters.
"""

from __future__ import annotations

import collections
import functools
import re
import unicodedata
from typing import Any

# Scripts written without spaces between words (code point ranges, for a regex class).
UNSEGMENTED = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"  # Hiragana, Katakana (+ half-width)
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-H
)
_UNSEGMENTED_CHAR = re.compile(f"[{UNSEGMENTED}]")
# One unit: a character of an unsegmented script, or a run of anything else but whitespace.
_UNIT = re.compile(f"[{UNSEGMENTED}]|[^\\s{UNSEGMENTED}]+")
# The combining marks that are part of letters (for a regex class): Python's \w leaves out
# Devanagari vowel signs and Arabic harakat, which would cut every Hindi word in pieces.
MARKS = (
    r"\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f"
    r"\u0670\u06d6-\u06ed\u0900-\u0903\u093a-\u094f\u0951-\u0957\u0962\u0963"
    r"\u0e31\u0e34-\u0e3a\u0e47-\u0e4e"
)
_LETTERS = re.compile(rf"(?:[^\W\d_]|[{MARKS}])+")  # letter runs with their combining marks

# Most frequent words per writing system (char: single characters counted; word: lower-cased
# letter runs counted). Lists are unions over the script's major languages.
_FUNCTION_WORDS: dict[str, tuple[str, frozenset[str]]] = {
    "latin": (
        "word",
        frozenset(
            # en
            "the of and to in is it that for was on with as at by be this are from or an not "
            "but have has had which we you he she they his her their if all can will would "
            "there been one so what when who no do up out about into than then its our more "
            # es / pt / it / fr / de / nl
            "de la que el en y los del se las un por con una su para es al lo como más pero "
            "sus le ya o este si porque esta entre cuando muy sin sobre también me hasta hay "
            "do da em um para é com não uma os no na por mais as dos como mas foi ao ele das "
            "il di che è per del non una sono della le si gli nel alla anche ma ha dei "
            "et les des est une pas qui dans ce sur au avec il plus par ne je sont nous vous "
            "der die und den von zu das mit sich des auf für ist im dem nicht ein eine als "
            "auch es an er hat aus bei sie nach wird wie einer um noch wurde oder "
            "het een van en te dat op voor zijn met niet aan er maar om ook als bij "
            # pl / cs / tr / id / vi / sw / ro / sv / da / fi / hu
            "i w nie na się że do jest to jak ale za od po tak jego są a z o "
            "je se na že to v do by jak ale si jsou "
            "ve bir bu da için ile olarak daha çok gibi ama olan sonra kadar "
            "yang dan di ini itu dengan untuk dari dalam tidak akan pada ke ada juga "
            "của và là có các được trong cho không những người một này với đã khi "
            "na ya wa kwa za katika ni kama hiyo lakini "
            "și în care cu pe nu un o la mai "
            "och att som för på är av med till den det inte har "
            "og at er af til på med som ikke han "
            "ja on ei se että hän oli ovat mutta "
            "az hogy nem egy és is meg"
            "".split()
        ),
    ),
    "cyrillic": (
        "word",
        frozenset(
            "и в не на что с я он как по но это к у же из за то а о от так все она его "
            "было был для мы вы до они бы ее мне только уже когда или если ни еще нет "
            "при там где чтобы может этот эти также быть есть было были "
            "і та що на не як це до з у за від але й є "  # uk
            "и на да се в за от не е че по с са като"  # bg / sr / mk
            "".split()
        ),
    ),
    "arabic": (
        "word",
        frozenset(
            "في من على إلى أن عن مع هذا هذه التي الذي ما لا كان قد هو هي ثم أو بين كل "
            "بعد عند لم إن كما و وفي ومن به لها له "
            "و در به از که این را با است آن برای یک شد می "  # fa
            "کے کی ہے میں اور کا کو سے نے یہ ہیں"  # ur
            "".split()
        ),
    ),
    "devanagari": (
        "word",
        frozenset(
            "के है में की और का को से एक यह पर ने भी कि हैं था थी थे तो हो कर गया लिए "
            "इस किया जो नहीं वह आप हम साथ अपने "
            "आणि आहे या ते की हे"  # mr
            "".split()
        ),
    ),
    "greek": ("word", frozenset("και το να η ο της του σε με για που τα οι στο την είναι".split())),
    "hebrew": ("word", frozenset("של את על לא הוא זה עם כי אני גם היא או אם כל".split())),
    "hangul": ("char", frozenset("이의는을를에가은하고다도로한지서와과들게기")),
    "han_kana": (
        "char",
        frozenset(
            "的了是在不和有我这他也就人们中一个上为来到说要以会着对"  # zh
            "のにはをたがでてとしもなるれかいうこあ"  # ja (kana particles and endings)
        ),
    ),
    "thai": (
        "substring",
        frozenset("ที่ การ และ ใน เป็น ของ ได้ มี ไม่ ว่า จะ ให้ นี้ ก็ คือ กับ แล้ว".split()),
    ),
}


# Code point ranges (inclusive) of the writing systems with a stopword list.
_SCRIPTS = (
    ("latin", ((0, 0x24F), (0x1E00, 0x1EFF))),
    ("cyrillic", ((0x400, 0x52F),)),
    ("arabic", ((0x600, 0x6FF), (0x750, 0x77F), (0xFB50, 0xFEFF))),
    ("devanagari", ((0x900, 0x97F),)),
    ("greek", ((0x370, 0x3FF),)),
    ("hebrew", ((0x590, 0x5FF),)),
    ("hangul", ((0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F))),
    ("thai", ((0xE00, 0xE7F),)),
)


@functools.lru_cache(maxsize=1 << 16)  # called per letter of every document; letters repeat
def _script_of(ch: str) -> str | None:
    """The writing system of one letter, by code point; None for scripts without a list."""
    o = ord(ch)
    for script, ranges in _SCRIPTS:
        if any(lo <= o <= hi for lo, hi in ranges):
            return script
    if _UNSEGMENTED_CHAR.match(ch):
        return "han_kana" if o >= 0x3040 else None
    return None


def units(text: str) -> list[str]:
    """Words for segmented scripts, single characters for unsegmented ones."""
    return _UNIT.findall(text)


def unsegmented_chars(text: str) -> int:
    return len(_UNSEGMENTED_CHAR.findall(text))


def is_letter(ch: str) -> bool:
    """Letters and the combining marks that are part of them (Devanagari vowel signs, Arabic
    harakat): `str.isalpha` alone counts हिन्दी as 3 letters of 6."""
    return ch.isalpha() or unicodedata.category(ch)[0] == "M"


def dominant_script(text: str) -> str | None:
    """The writing system of most of the letters (None: no letters, or no list for it)."""
    counts = collections.Counter(_script_of(ch) for ch in text if ch.isalpha())
    if not counts:
        return None
    script, _ = counts.most_common(1)[0]
    return script


# Below this many words (characters, for character-level scripts) the rate is noise: a
# ten-word caption may hold no function word at all.
FUNCTION_WORDS_MIN_UNITS = 30


def function_word_frac(text: str) -> float | None:
    """Function words / units of the dominant script; None where there is no list for it or
    too little text of it to tell."""
    script = dominant_script(text)
    if script not in _FUNCTION_WORDS:
        return None
    level, words = _FUNCTION_WORDS[script]
    if level == "word":
        runs = [w.casefold() for w in _LETTERS.findall(text) if _script_of(w[0]) == script]
        hits, total = sum(w in words for w in runs), len(runs)
    else:
        chars = [ch for ch in text if _script_of(ch) == script]
        total = len(chars)
        if level == "char":
            hits = sum(ch in words for ch in chars)
        else:  # substrings (Thai words are runs of an alphabet, with no spaces between)
            hits = sum(text.count(w) * len(w) for w in words)
    return hits / total if total >= FUNCTION_WORDS_MIN_UNITS else None


@functools.cache
def _identifier() -> Any:  # py3langid ships no type hints
    # Loaded once per process (0.8 s): the model ships inside py3langid's wheel (npz, no pickle).
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


LANGUAGE_SAMPLE_CHARS = 4000
UNDETERMINED = "und"


def identify(text: str) -> str:
    """ISO 639-1 code of the text's language; 'und' for no letters or no linguistic content."""
    sample = text[:LANGUAGE_SAMPLE_CHARS]
    if not any(ch.isalpha() for ch in sample):
        return UNDETERMINED
    lang, _ = _identifier().classify(sample)
    return UNDETERMINED if lang == "zxx" else lang


def known_tags() -> list[str]:
    """Every tag `identify` can return."""
    return sorted(set(_identifier().nb_classes) - {"zxx"} | {UNDETERMINED})
