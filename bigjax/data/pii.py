"""Personal-data scrubbing: typed placeholders for secrets, emails, IBANs, cards, national ids,
IP addresses and phone numbers, in text of any language.

Every detector reports spans on the original text; overlapping spans are settled by the order
of `PII_TYPES` (the more specific kind wins: a card number is not half-eaten as a phone), then
all are replaced at once. Numbers are validated, not just matched: cards by Luhn, IBANs by ISO
13616 mod 97, national ids by their own check digits (python-stdnum), phone numbers by Google's
libphonenumber metadata (the `phonenumbers` package: every region's numbering plan, with or
without country code and separators), email addresses in any script (`müller@`, `иван@почта.рф`).
Boundaries are ASCII-only, so an address glued to Chinese text (`邮箱a@b.cn`,
`电话13812345678。`) is still one token.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence

from bigjax.data.language import MARKS, UNSEGMENTED

PII_TYPES = (
    "SECRET",
    "EMAIL",
    "IBAN",
    "NATIONAL_ID",  # before cards: an 18-digit Chinese id passes Luhn one time in ten
    "CREDIT_CARD",
    "IPV6",
    "IPV4",
    "PHONE",
)

Span = tuple[int, int, str]  # [start, end), kind

_SECRET = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"  # GitHub tokens
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}\b"  # Slack tokens
    r"|\bAIza[0-9A-Za-z_-]{35}\b"  # Google API keys
    r"|\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}\b"  # Stripe keys
    r"|\bsk-[A-Za-z0-9_-]{20,}\b",  # OpenAI-style keys
    re.DOTALL | re.ASCII,
)
# Names that say "password" in the languages people write configs in (English names are
# `_SECRET_NAME`'s): a value quoted after one is a secret whatever the language of the text.
_PASSWORD_WORDS = (
    "passwort|kennwort|mot[_ -]?de[_ -]?passe|contrase[nñ]a|senha|wachtwoord|has[lł]o|parola"
    "|[sş]ifre|l[oö]senord|salasana|heslo|jelsz[oó]|пароль|密码|密碼|パスワード|비밀번호"
)
# key = "value" assignments whose name is a password word of another language (`mot de passe`,
# `密码`): only the value (group 3) is replaced. English names are `_NAMED_QUOTED`'s. The
# boundary before the name is ASCII's, as the module's others (密码 glued to Chinese text).
_SECRET_ASSIGNMENT = re.compile(
    rf"""(?i)(?<![A-Za-z0-9_])((?:{_PASSWORD_WORDS})\s*[:=：]\s*)(['"])([^'"\s]{{8,}})\2"""
)
# A quoted value given to a name, bare or itself quoted (code, JSON, YAML, a dict, Ruby's =>):
# a secret if the name's last word says so (`_is_secret_name`: DB_PASSWORD, dbPassword,
# "api-key"). The name is checked after the match, as below; it starts where no name char is.
_NAMED_QUOTED = re.compile(
    r"""(?<![A-Za-z0-9_$-])(['"]?)([A-Za-z][A-Za-z0-9_-]*)\1\s*(?:=>|[:=：])\s*(['"])([^'"\s]{8,})\3"""
)
# An environment file's line (.env, docker-compose, shell): NAME=value, unquoted; a secret if
# the name says so (`_SECRET_NAME`, checked after the match: inside this pattern its
# alternation, tried at every split of a long name, made a line of capitals quadratic).
_ENV_LINE = re.compile(r"^[ \t]*(?:export[ \t]+)?([A-Z0-9_]+)=([^\s'\"#]{8,})[ \t]*$", re.MULTILINE)
# A YAML or config file's line, `name: value`, unquoted (a list item's too). Not a value that
# reads as code: brackets, commas, or letters and dots alone (`_NAME_LIKE`).
_YAML_LINE = re.compile(
    r"^[ \t]*(?:-[ \t]+)?([A-Za-z][A-Za-z0-9_-]*):[ \t]+([^\s'\"#()\[\]{},;]{8,})[ \t]*$",
    re.MULTILINE,
)
# the name's last word (HF_TOKEN, AWS_SECRET_ACCESS_KEY; not MAX_TOKENS or PASSWORD_FILE)
_SECRET_NAME = re.compile(
    "(?:^|_)(?:PASSWORD|PASSWD|SECRET|SECRET_KEY|API_?KEY|ACCESS_KEY|PRIVATE_KEY|TOKEN)$"
)
_CAMEL_HUMP = re.compile("(?<=[a-z0-9])(?=[A-Z])")
# what a code line's annotation or reference looks like (`api_key: SecretStr`, `token:
# tok.string`): letters, `_` and dots only. A password of lowercase letters alone is not
# one (`password: correcthorse`): types are capitalised or dotted, and builtins are short.
_NAME_LIKE = re.compile(r"[A-Za-z_][A-Za-z_.]*")
_PASSWORD_NAME = re.compile("(?:^|_)(?:PASSWORD|PASSWD)$")


def _words(name: str) -> str:
    """A setting's name as upper-case words joined by `_`: dbPassword, db-password ->
    DB_PASSWORD."""
    return _CAMEL_HUMP.sub("_", name).upper().replace("-", "_")


def _is_secret_name(name: str) -> bool:
    """Whether a setting's name ends in a secret's word, in any case style: DB_PASSWORD,
    dbPassword, api-key, AWS_SECRET_ACCESS_KEY."""
    return bool(_SECRET_NAME.search(_words(name)))


def _is_yaml_secret(name: str, value: str) -> bool:
    """Whether a YAML line's unquoted value is a secret: its name says so and the value does
    not read as code, unless it is a password of lowercase letters alone (`db_password:
    correcthorse`; a type is `SecretStr` or `tok.string`)."""
    if not _is_secret_name(name):
        return False
    if not _NAME_LIKE.fullmatch(value):
        return True
    return bool(_PASSWORD_NAME.search(_words(name))) and value.isalpha() and value.islower()


# Addresses in any script (RFC 6531 and IDNA: müller@, josé.garcía@, иван@почта.рф,
# 김철수@예시.한국, 张伟@例子.中国), with the full-width ＠ of CJK text too. The local part is the
# run before the @ of either ASCII's characters and the letters, digits and marks of scripts
# written with spaces (so `邮箱zhang.san@` keeps 邮箱), or characters of a script written
# without spaces: where a name glued to such text begins cannot be told, so the words glued
# before it go too (privacy first). ASCII-only, müller@ lost "mü" and info@münchen.de was not
# found at all. Matched outward from each @ (`_email_spans`): tried at every position of a
# text, these Unicode classes took 7 times the ASCII pattern's time.
_LOCAL_REVERSED = re.compile(rf"(?:[^\W{UNSEGMENTED}]|[%+.{MARKS}-])+|[{UNSEGMENTED}]+")
_DOMAIN = re.compile(
    rf"[@＠](?:[^\W_]|[{MARKS}-])+(?:\.(?:[^\W_]|[{MARKS}-])+)*\."
    rf"(?:[A-Za-z]{{2,}}(?![A-Za-z0-9-])|xn--[A-Za-z0-9-]+|(?:[^\W\d_]|[{MARKS}]){{2,}}(?![\w-]))"
)
_AT = re.compile("[@＠]")
# How far from its @ an address is read: a local part is at most 64 characters and a domain
# 253 (RFC 5321); a longer run of text glued before it is cut there
_LOCAL_MAX, _DOMAIN_MAX = 256, 256
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?")
# Not the digits of a float, a hex constant or an identifier.
# Not the digits of a float, a hex constant, an identifier or a +country phone number.
_CARD = re.compile(r"(?<![0-9A-Za-z_.+-])[0-9](?:[ -]?[0-9]){12,18}(?![0-9A-Za-z_-])(?![.,][0-9])")
_IPV4 = re.compile(
    # Any punctuation around it, a sentence's full stop included; but not a piece of a longer
    # dotted number (1.2.3.4.5 is a version, not an address).
    r"(?<![0-9A-Za-z_])(?<![0-9]\.)(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?![0-9A-Za-z_])(?!\.[0-9])"
)
_IPV6 = re.compile(
    r"(?<![0-9A-Za-z_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{0,4})(?:%[0-9A-Za-z]+)?(?![0-9A-Za-z_.:])"
)
# National ids with a check digit (or, for US SSNs, a distinctive written form), as written;
# each candidate must pass one of the python-stdnum validators of its shape.
_NATIONAL_IDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"[0-9]{17}[0-9Xx]", ("cn.ric",)),  # China resident identity card
    (r"[0-9]{6}-[0-9]{7}", ("kr.rrn",)),  # Korea resident registration number
    (r"[2-9][0-9]{3}[ -]?[0-9]{4}[ -]?[0-9]{4}", ("in_.aadhaar", "jp.in_")),  # Aadhaar, My Number
    (r"[0-9]{3}\.[0-9]{3}\.[0-9]{3}-[0-9]{2}", ("br.cpf",)),  # Brazil CPF
    (r"[0-9]{8}-?[A-Z]|[XYZ]-?[0-9]{7}-?[A-Z]", ("es.dni", "es.nie")),  # Spain DNI / NIE
    (r"[12] ?[0-9]{2} ?[0-9]{2} ?(?:[0-9]{2}|2A|2B) ?[0-9]{3} ?[0-9]{3} ?[0-9]{2}", ("fr.nir",)),
    (r"[A-Z]{6}[0-9L-V]{2}[A-Z][0-9L-V]{2}[A-Z][0-9L-V]{3}[A-Z]", ("it.codicefiscale",)),
    (r"(?:[0-9]{2})?[0-9]{6}[-+][0-9]{4}", ("se.personnummer",)),  # Sweden
    (r"[0-9]{6}[-+ABCDEFUVWXY][0-9]{3}[0-9A-Y]", ("fi.hetu",)),  # Finland
    (r"[0-9]{11}", ("pl.pesel",)),  # Poland (date and check digit)
    (r"[0-9]{3}-[0-9]{2}-[0-9]{4}", ("us.ssn",)),  # US social security number
    (r"[0-9]{3}[ -][0-9]{3}[ -][0-9]{3}", ("ca.sin",)),  # Canada social insurance number
)
# Not a piece of a longer grouped number (an invalid card's last 12 digits are no Aadhaar).
# The cheap look-ahead first: the alternation is tried only where an id can start.
_NATIONAL_ID = re.compile(
    r"(?=[0-9A-Z])(?<![0-9A-Za-z+])(?<![0-9][ .-])(?:"
    + "|".join(p for p, _ in _NATIONAL_IDS)
    + r")(?![0-9A-Za-z])(?![ .-][0-9])"
)
# A run that could hold a phone number: at least 7 digits with phone punctuation between.
_PHONE_CANDIDATE = re.compile(r"[0-9０-９](?:[\s().\-/]{0,3}[0-9０-９]){6,}")

# Where national (no country code) numbers are looked for, by the document's language.
# Numbers written with a country code are found whatever the language.
REGIONS_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": ("US", "GB", "IN", "AU", "CA", "ZA", "NG", "IE", "NZ", "PH"),
    "zh": ("CN", "TW", "HK", "SG"),
    "ja": ("JP",),
    "ko": ("KR",),
    "ar": ("SA", "EG", "AE", "MA"),
    "hi": ("IN",),
    "ru": ("RU", "KZ"),
    "uk": ("UA",),
    "de": ("DE", "AT", "CH"),
    "fr": ("FR", "BE", "CA", "CH"),
    "es": ("ES", "MX", "AR", "CO"),
    "pt": ("BR", "PT"),
    "it": ("IT", "CH"),
    "sv": ("SE", "FI"),
    "nl": ("NL", "BE"),
    "pl": ("PL",),
    "tr": ("TR",),
    "id": ("ID",),
    "vi": ("VN",),
    "th": ("TH",),
    "fa": ("IR",),
    "he": ("IL",),
}
DEFAULT_REGIONS = ("US", "GB", "IN", "CN")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    if not (13 <= len(digits) <= 19 and luhn_valid(digits)):
        return False
    # Written as cards are: ungrouped, in fours, or Amex/Diners 4-6-5 / 4-6-4 (not a table of
    # small numbers, not 123456789 123456789).
    sizes = [len(g) for g in re.split(r"[ -]", m.group())]
    fours = all(n == 4 for n in sizes[:-1]) and 1 <= sizes[-1] <= 4
    return len(sizes) == 1 or fours or sizes in ([4, 6, 5], [4, 6, 4])


def _is_ipv6(m: re.Match) -> bool:
    address = m.group().split("%")[0]
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    # Code slices (a[1::2], b[10::20], a[::1000]) are valid addresses too; real ones have
    # three or more colons, or hex on both sides with a group of 3+ digits (fe80::1).
    if address.count(":") >= 3:
        return True
    head, _, tail = address.partition("::")
    return bool(head and tail) and any(len(g) >= 3 for g in address.split(":"))


def _is_personal_ipv4(m: re.Match) -> bool:
    # 0.0.0.0, loopback and broadcast name no machine of anyone's; everything else (private
    # ranges too: they map a network) is scrubbed.
    address = ipaddress.IPv4Address(m.group())
    return not (address.is_unspecified or address.is_loopback or m.group() == "255.255.255.255")


@functools.cache
def _validators(names: tuple[str, ...]) -> tuple[Callable[[str], bool], ...]:
    import importlib

    return tuple(importlib.import_module(f"stdnum.{n}").is_valid for n in names)


def _is_national_id(m: re.Match) -> bool:
    text = m.group()
    for pattern, names in _NATIONAL_IDS:
        if re.fullmatch(pattern, text) and any(valid(text) for valid in _validators(names)):
            return True
    return False


def _regex_spans(
    kind: str, pattern: re.Pattern, text: str, valid: Callable[[re.Match], bool] | None = None
) -> Iterator[Span]:
    for m in pattern.finditer(text):
        if valid is None or valid(m):
            yield m.start(), m.end(), kind


def _email_spans(text: str) -> Iterator[Span]:
    """Addresses: from each @ not inside one found, the local part read backwards (the
    characters are classes, so the same pattern reads a reversed run) and the domain forwards;
    each @ costs the address's length, however the text around it looks."""
    end = 0
    for at in _AT.finditer(text):
        i = at.start()
        if i < end or not (domain := _DOMAIN.match(text, i, i + _DOMAIN_MAX)):
            continue
        before = text[max(end, i - _LOCAL_MAX) : i][::-1]
        if local := _LOCAL_REVERSED.match(before):
            yield i - local.end(), domain.end(), "EMAIL"
            end = domain.end()


def _phone_spans(text: str, regions: Sequence[str]) -> Iterator[Span]:
    """Valid numbers of any region written with a country code, and national numbers of
    `regions`. Only the stretches that hold a digit run long enough are handed to the
    matcher: it is slow, and most text has none."""
    import phonenumbers

    for candidate in _PHONE_CANDIDATE.finditer(text):
        # The matcher needs the '+' and the brackets around the run.
        start = max(candidate.start() - 6, 0)
        end = min(candidate.end() + 2, len(text))
        window = text[start:end]
        for region in regions:
            for match in phonenumbers.PhoneNumberMatcher(
                window, region, leniency=phonenumbers.Leniency.VALID
            ):
                begin, end = start + match.start, start + match.end
                if _stands_alone(text, begin, end) and (
                    not match.raw_string.strip("[]()").isdigit()
                    or _PHONE_CONTEXT.search(text, max(begin - 40, 0), begin)
                ):
                    yield begin, end, "PHONE"


# A bare run of digits (no '+', no separators) is a phone number only after a word that says
# so: in code and tables such runs are constants, ids and timestamps (2147483647 is a valid US
# number). Written with a country code or separators, a number needs no label.
_PHONE_CONTEXT = re.compile(
    "|".join(
        [
            r"(?i:tel|phone|call|mobile|cell|fax|whatsapp|sms|contact|number|dial|ring)",
            r"(?i:telefon|téléphone|teléfono|telefone|telefono|numéro|número|nummer|appel)",
            "телефон|номер|звон|тел",
            "هاتف|رقم|اتصل|اتصال|جوال",
            "फोन|फ़ोन|मोबाइल|संपर्क|नंबर",
            "电话|電話|手机|手機|联系|聯繫|致电|拨打|撥打|号码|號碼|携帯|連絡|番号",
            "전화|연락|휴대폰|번호",
            "โทร|เบอร์|تلفن|شماره|טלפון|נייד|điện thoại|(?i:telepon|nomor|hubungi)",
            "☎|📞|📱",
        ]
    )
)


# Dates and times (2003-04-11 12:42-0400) and tables of small numbers ("6  7  8  9 10") are
# runs of digits with separators too.
_DATE_OR_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{2}:[0-9]{2}")


def _other_number(text: str, start: int, end: int) -> bool:
    """Decimals, dotted quads, dates, and tables of small numbers (a calendar's "27 28 29 30
    31") that libphonenumber reads as valid numbers of some region."""
    raw = text[start:end]
    if re.fullmatch(r"[0-9]+\.[0-9]+|[0-9]{1,3}(?:\.[0-9]{1,3}){3}", raw):
        return True
    if re.fullmatch(r"[0-9]{1,2}[./-][0-9]{1,2}[./-][0-9]{2,4}", raw):
        return True
    groups = re.findall(r"[0-9]+", raw)
    if sum(len(g) == 1 for g in groups) > 2 or "  " in raw:
        return True
    around = text[max(start - 2, 0) : end + 2]
    return not raw.startswith("+") and all(len(g) <= 2 for g in groups) and "  " in around


_NUMBER_BEFORE = re.compile(r"(?:[0-9A-Za-z_]|[-.][0-9]*|0[xX][0-9A-Fa-f]*)$")
_NUMBER_AFTER = re.compile(r"[0-9A-Za-z_]|[.,][0-9]")


def _stands_alone(text: str, start: int, end: int) -> bool:
    """Not a piece of a number in code: a negative or hex constant, a float, an exponent, an
    identifier. (The matcher accepts -2147483648 and 1170979200.0 as US numbers.)"""
    before = text[max(start - 12, 0) : start]
    if _DATE_OR_TIME.search(text[max(start - 6, 0) : end + 6]) or _other_number(text, start, end):
        return False
    return not _NUMBER_BEFORE.search(before) and not _NUMBER_AFTER.match(text, end)


_OTHER_DIGIT = re.compile(r"(?![0-9])\d")  # a str pattern's \d: any script's decimal digit


@functools.cache
def _digit_table() -> dict[int, str]:
    """Every script's decimal digits (Devanagari ९, Arabic-Indic ٥, full-width ５, ...) as
    ASCII, one character for one. Built on first use: it scans all of Unicode (~0.3 s)."""
    return {
        c: str(unicodedata.decimal(chr(c)))
        for c in range(0x80, sys.maxunicode + 1)
        if unicodedata.category(chr(c)) == "Nd"
    }


def ascii_digits(text: str) -> str:
    """`text` with its digits in ASCII and the same length, so that spans found in it are
    spans of `text`; text with no other digits is returned as it is."""
    if text.isascii() or not _OTHER_DIGIT.search(text):
        return text
    return text.translate(_digit_table())


def find(text: str, language: str = "und") -> list[Span]:
    """Non-overlapping personal-data spans of `text`, sorted by position. Numbers are read in
    any script's digits (`ascii_digits`): a phone number written ९८७६५४३२१० is one too."""
    # The language's regions first, then the widest-used national formats whatever the tag (a
    # short Chinese note may be tagged 'ja'; an English page may quote a UK number).
    regions = tuple(dict.fromkeys(REGIONS_BY_LANGUAGE.get(language, ()) + DEFAULT_REGIONS))
    numbers = ascii_digits(text)
    found: list[Span] = [
        (m.start(3), m.end(3), "SECRET") for m in _SECRET_ASSIGNMENT.finditer(text)
    ]
    found += [  # an enum's constant (`FORCE_CHANGE_PASSWORD = "FORCE_CHANGE_PASSWORD"`) is none
        (m.start(4), m.end(4), "SECRET")
        for m in _NAMED_QUOTED.finditer(text)
        if _is_secret_name(m.group(2)) and m.group(4).lower() != m.group(2).lower()
    ]
    found += [
        (m.start(2), m.end(2), "SECRET")
        for m in _ENV_LINE.finditer(text)
        if _SECRET_NAME.search(m.group(1))
    ]
    found += [
        (m.start(2), m.end(2), "SECRET")
        for m in _YAML_LINE.finditer(text)
        if _is_yaml_secret(m.group(1), m.group(2))
    ]
    found += _regex_spans("SECRET", _SECRET, text)
    found += _email_spans(text)
    found += _regex_spans("IBAN", _IBAN, numbers, lambda m: iban_valid(m.group()))
    found += _regex_spans("NATIONAL_ID", _NATIONAL_ID, numbers, _is_national_id)
    found += _regex_spans("CREDIT_CARD", _CARD, numbers, _is_card)
    found += _regex_spans("IPV6", _IPV6, numbers, _is_ipv6)
    found += _regex_spans("IPV4", _IPV4, numbers, _is_personal_ipv4)
    found += _phone_spans(numbers, regions)
    rank = {kind: i for i, kind in enumerate(PII_TYPES)}
    taken: list[Span] = []
    for span in sorted(found, key=lambda s: (rank[s[2]], s[0], -s[1])):
        if all(span[1] <= t[0] or span[0] >= t[1] for t in taken):
            taken.append(span)
    return sorted(taken)


def scrub(text: str, language: str = "und") -> tuple[str, dict[str, int]]:
    """Replaces personal data with `<TYPE>` placeholders; returns the text and counts per type.
    `language` (ISO 639-1) picks the regions whose national phone formats are recognised."""
    counts: collections.Counter[str] = collections.Counter()
    pieces, last = [], 0
    for start, end, kind in find(text, language):
        pieces += [text[last:start], f"<{kind}>"]
        counts[kind] += 1
        last = end
    pieces.append(text[last:])
    return "".join(pieces), dict(counts)
