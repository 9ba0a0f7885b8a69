"""Normalisation, quality filters and personal-data scrubbing on handmade and real text."""

import pytest

from bigjax.data.clean import QualityConfig, normalize, quality_reason
from bigjax.data.corpus import stdlib_files
from bigjax.data.pii import iban_valid, luhn_valid, scrub


def test_normalize():
    text = "Cafe\u0301\r\nline two   \r\n\x00bad\x07ctrl\u200b\n\n\n\n\n\n    indented\t\n"
    assert normalize(text) == "Café\nline two\nbadctrl\n\n\n    indented"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("short", "too_short"),
        ("1234 5678 9012 3456 7890 1234 5678 9012 3456 " * 3, "low_alpha_fraction"),
        ("same line here\n" * 20 + "one other line\n", "duplicate_lines"),
        ("buy now cheap " * 30, "repeated_ngrams"),
        ("a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2, "mean_word_length"),
        ("A normal paragraph of English prose, with words of sensible length and no spam.", None),
    ],
)
def test_quality_reasons(text, reason):
    assert quality_reason(text, QualityConfig()) == reason


def test_quality_defaults_keep_most_real_code():
    files = stdlib_files()[::10]
    texts = [normalize(p.read_bytes().decode("utf-8", "replace")) for p in files]
    kept = sum(quality_reason(t, QualityConfig()) is None for t in texts if t)
    assert kept / len(texts) > 0.9


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB00WEST12345698765432")


@pytest.mark.parametrize(
    "text, kind",
    [
        ("mail jane.doe+x@mail.example.co.uk now", "EMAIL"),
        ("call +44 20 7946 0958 today", "PHONE"),
        ("call (415) 555-0132 today", "PHONE"),
        ("host 10.0.12.254 is up", "IPV4"),
        ("host 2001:db8:85a3::8a2e:370:7334 is up", "IPV6"),
        ("card 4111-1111-1111-1111 ok", "CREDIT_CARD"),
        ("card 378282246310005 ok", "CREDIT_CARD"),
        ("iban DE89 3704 0044 0532 0130 00 ok", "IBAN"),
        ("aws AKIAIOSFODNN7EXAMPLE key", "SECRET"),
        ("tok ghp_" + "a1B2" * 9 + " end", "SECRET"),
        ('api_key = "Zx81hs7Gq2LmWw"', "SECRET"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "SECRET"),
    ],
)
def test_each_kind_is_replaced_by_its_placeholder(text, kind):
    out, counts = scrub(text)
    assert counts == {kind: 1}, (out, counts)
    assert f"<{kind}>" in out


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",
        "iban GB00 WEST 1234 5698 7654 32 fails mod-97",
        "x = a[1::2]; y = b[::3]",
        "python 3.11.7 and numpy 1.26.4",
        "date 2024-01-15",
        "id 1234567",
        "t = (12, 34, 56)",
    ],
)
def test_look_alikes_are_left_alone(text):
    assert scrub(text) == (text, {})


def test_api_key_value_only_is_replaced():
    out, _ = scrub('password: "hunter2hunter2"')
    assert out == 'password: "<SECRET>"'
