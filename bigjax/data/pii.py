"""Personal-data scrubbing: typed placeholders for emails, phones, IPs, cards, IBANs, secrets.

Numbers that only look like cards or IBANs are left alone: candidates must pass the Luhn or the
ISO 13616 mod-97 check. Order matters: longer, more specific patterns run first so that, e.g.,
a card number is not half-eaten by the phone pattern.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from collections.abc import Callable

PII_TYPES = ("SECRET", "EMAIL", "IBAN", "CREDIT_CARD", "IPV6", "IPV4", "PHONE")

_SECRET = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"  # GitHub tokens
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}\b"  # Slack tokens
    r"|\bAIza[0-9A-Za-z_-]{35}\b"  # Google API keys
    r"|\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}\b"  # Stripe keys
    r"|\bsk-[A-Za-z0-9_-]{20,}\b",  # OpenAI-style keys
    re.DOTALL,
)
# key = "value" assignments whose name says secret: only the value is replaced.
_SECRET_ASSIGNMENT = re.compile(
    r"""(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)"""
    r"""\s*[:=]\s*)(['"])([^'"\s]{8,})\2"""
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
    r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,5}(?![\w])"
)


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
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _is_ipv6(m: re.Match) -> bool:
    # Three or more colons: slices like a[1::2] or '::' in code are not addresses.
    if m.group().count(":") < 3:
        return False
    try:
        ipaddress.IPv6Address(m.group())
    except ValueError:
        return False
    return True


def _is_phone(m: re.Match) -> bool:
    # A phone number stands alone: not one group of a longer digit run (an invalid card
    # number, an account number), and at most 15 digits (E.164).
    before, after = m.string[max(m.start() - 2, 0) : m.start()], m.string[m.end() : m.end() + 2]
    if re.search(r"\d[ .-]?$", before) or re.match(r"[ .-]?\d", after):
        return False
    return 7 <= len(re.sub(r"\D", "", m.group())) <= 15


_RULES: tuple[tuple[str, re.Pattern, Callable[[re.Match], bool] | None], ...] = (
    ("SECRET", _SECRET, None),
    ("EMAIL", _EMAIL, None),
    ("IBAN", _IBAN, lambda m: iban_valid(m.group())),
    ("CREDIT_CARD", _CARD, _is_card),
    ("IPV6", _IPV6, _is_ipv6),
    ("IPV4", _IPV4, None),
    ("PHONE", _PHONE, _is_phone),
)


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """Replaces personal data with `<TYPE>` placeholders; returns the text and counts per type."""
    counts: collections.Counter[str] = collections.Counter()

    def assignment(m: re.Match) -> str:
        counts["SECRET"] += 1
        return f"{m.group(1)}{m.group(2)}<SECRET>{m.group(2)}"

    text = _SECRET_ASSIGNMENT.sub(assignment, text)
    for kind, pattern, valid in _RULES:

        def replace(m: re.Match, kind: str = kind, valid=valid) -> str:
            if valid is not None and not valid(m):
                return m.group()
            counts[kind] += 1
            return f"<{kind}>"

        text = pattern.sub(replace, text)
    return text, dict(counts)
