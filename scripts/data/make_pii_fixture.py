"""Writes tests/fixtures/pii_planted.jsonl: personal data planted in sentences of many languages.

One record per planted item: {"text", "value", "kind", "format", "language"}. Phone numbers are
valid numbers of their region (libphonenumber's example numbers with varied last digits), written
in every common layout; cards pass Luhn, IBANs mod 97 and national ids their check digits, all
computed here, so the set is reproducible and needs no download.

    python scripts/data/make_pii_fixture.py            # rewrites the fixture (seeded)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pii_planted.jsonl"

SENTENCES = {
    "en": ["Please contact me at {} if anything changes.", "The old value was {}, per the note."],
    "zh": ["如有问题请联系{}，谢谢。", "我的信息是{}。"],
    "ja": ["お問い合わせは{}までお願いします。"],
    "ar": ["يرجى الاتصال على {} في أي وقت."],
    "hi": ["कृपया {} पर संपर्क करें।"],
    "ru": ["Звоните по номеру {} в любое время."],
    "de": ["Rufen Sie mich unter {} an."],
    "fr": ["Appelez-moi au {} demain matin."],
    "es": ["Llámame al {} mañana por la tarde."],
    "pt": ["Ligue para {} amanhã."],
    "it": ["Chiamami al numero {} domani mattina, per favore."],
    "ko": ["문의 사항이 있으시면 {}로 연락해 주시기 바랍니다."],
    "nl": ["Je kunt me bellen op {} als er iets verandert."],
    "sv": ["Du kan ringa mig på {} om något ändras."],
    "tr": ["Bir sorun olursa lütfen {} numarasından bize ulaşın."],
}
LANGUAGE_OF_REGION = {
    "US": "en", "GB": "en", "AU": "en", "IN": "hi", "CA": "en", "CN": "zh", "JP": "ja",
    "SA": "ar", "EG": "ar", "RU": "ru", "DE": "de", "FR": "fr", "ES": "es", "MX": "es",
    "BR": "pt", "IT": "it", "KR": "ko", "NL": "nl", "SE": "sv", "ZA": "en", "TR": "tr",
}  # fmt: skip


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def iban(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    return f"{country}{check:02d}{bban}"


def valid_numbers(rng: random.Random, region: str, kind: int, n: int) -> list:
    example = phonenumbers.example_number_for_type(region, kind)
    if example is None:
        return []
    out, national = [], str(example.national_number)
    for _ in range(200):
        candidate = national[:-2] + f"{rng.randrange(100):02d}"
        number = phonenumbers.parse(f"+{example.country_code}{candidate}")
        if phonenumbers.is_valid_number(number) and number not in out:
            out.append(number)
        if len(out) == n:
            break
    return out


def main() -> None:
    rng = random.Random(0)
    items: list[dict] = []

    def plant(value: str, kind: str, fmt: str, lang: str, written: str = "{}") -> None:
        template = rng.choice(SENTENCES[lang])
        items.append(
            {
                "text": template.format(written.format(value)),
                "value": value,
                "kind": kind,
                "format": fmt,
                "language": lang,
            }
        )

    for region, lang in LANGUAGE_OF_REGION.items():
        for kind in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE):
            for number in valid_numbers(rng, region, kind, 2):
                e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
                intl = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
                national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
                plant(e164, "PHONE", "phone_e164", rng.choice(list(SENTENCES)))
                plant(intl, "PHONE", "phone_international", lang)
                plant(national, "PHONE", "phone_national", lang)
                rfc = phonenumbers.format_number(number, PhoneNumberFormat.RFC3966)[4:]
                plant(rfc, "PHONE", "phone_international_dashes", lang)
    for n in valid_numbers(rng, "US", PhoneNumberType.FIXED_LINE, 6):
        d = str(n.national_number)
        plant(f"{d[:3]}.{d[3:6]}.{d[6:]}", "PHONE", "phone_us_dots", "en")
        plant(f"({d[:3]}) {d[3:6]}-{d[6:]}", "PHONE", "phone_us_parentheses", "en")
    for n in valid_numbers(rng, "US", PhoneNumberType.TOLL_FREE, 5):
        d = str(n.national_number)
        plant(f"1-{d[:3]}-{d[3:6]}-{d[6:]}", "PHONE", "phone_us_1_800", "en")
    for n in valid_numbers(rng, "CN", PhoneNumberType.MOBILE, 6):
        # written bare, after a word that says what it is (as bare numbers are in real text)
        label = rng.choice(["手机", "电话", "联系电话：", "请拨打"])
        plant(str(n.national_number), "PHONE", "phone_cn_mobile_bare", "zh", label + "{}")
    for n in valid_numbers(rng, "IN", PhoneNumberType.MOBILE, 4):
        label = rng.choice(["mobile ", "call ", "phone: "])
        plant(str(n.national_number), "PHONE", "phone_bare_labelled", "en", label + "{}")

    for i in range(10):
        user = rng.choice(["jane.doe", "li.wei", "m_ali+news", "anna-k", "x"]) + str(i)
        domain = rng.choice(["example.com", "mail.example.co.uk", "example.cn", "uni.edu"])
        plant(f"{user}@{domain}", "EMAIL", "email", rng.choice(list(SENTENCES)))
    for _ in range(8):
        a = ".".join(str(rng.randrange(1, 255)) for _ in range(4))
        plant(a, "IPV4", "ipv4", rng.choice(list(SENTENCES)))
        plant(a, "IPV4", "ipv4_port", "en", "{}:" + str(rng.randrange(1, 65535)))
        plant(a, "IPV4", "ipv4_brackets", "en", "({})")
        plant(a, "IPV4", "ipv4_cidr", "en", "{}/24")
    for _ in range(6):
        groups = [f"{rng.randrange(65536):x}" for _ in range(8)]
        plant(":".join(groups), "IPV6", "ipv6_full", "en")
        plant(f"2001:db8:{groups[2]}::{groups[7]}", "IPV6", "ipv6_compressed", "en")
        plant(f"fe80::{groups[5]}:{groups[6]}%eth0", "IPV6", "ipv6_zone", "en")
        plant(f"2001:db8::{groups[3]}", "IPV6", "ipv6_bracket_port", "en", "[{}]:8080")
    for prefix, length in (("4", 16), ("51", 16), ("37", 15), ("6011", 16), ("35", 16)) * 2:
        body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
        number = body + luhn_digit(body)
        spaced = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
        plant(rng.choice([number, spaced, spaced.replace(" ", "-")]), "CREDIT_CARD", "card", "en")
    for country, bban_len in (("DE", 18), ("GB", 18), ("FR", 23), ("ES", 20), ("NL", 14)) * 2:
        bank = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        digits = "".join(str(rng.randrange(10)) for _ in range(bban_len - 4))
        value = iban(country, bank + digits if country in ("GB", "NL") else digits + "0000")
        grouped = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
        plant(rng.choice([value, grouped]), "IBAN", "iban", "en")

    from stdnum import luhn, verhoeff
    from stdnum.br import cpf
    from stdnum.cn import ric
    from stdnum.es import dni
    from stdnum.in_ import aadhaar
    from stdnum.pl import pesel
    from stdnum.se import personnummer

    for _ in range(6):
        body = f"110105{rng.randrange(1950, 2005)}{rng.randrange(1, 13):02d}"
        body += f"{rng.randrange(1, 28):02d}{rng.randrange(1000):03d}"
        plant(body + ric.calc_check_digit(body + "0"), "NATIONAL_ID", "id_cn_ric", "zh")
        a = f"{rng.randrange(2, 10)}" + "".join(str(rng.randrange(10)) for _ in range(10))
        a += verhoeff.calc_check_digit(a)
        assert aadhaar.is_valid(a)
        plant(f"{a[:4]} {a[4:8]} {a[8:]}", "NATIONAL_ID", "id_in_aadhaar", "hi")
        c = "".join(str(rng.randrange(10)) for _ in range(9))
        c += cpf._calc_check_digits(c)  # noqa: SLF001 - the only way stdnum exposes it
        plant(f"{c[:3]}.{c[3:6]}.{c[6:9]}-{c[9:]}", "NATIONAL_ID", "id_br_cpf", "pt")
        d = f"{rng.randrange(10**7, 10**8)}"
        plant(d + dni.calc_check_digit(d), "NATIONAL_ID", "id_es_dni", "es")
        s = f"{rng.randrange(50, 99)}{rng.randrange(1, 13):02d}{rng.randrange(1, 28):02d}"
        s += f"{rng.randrange(100, 999)}"
        s += luhn.calc_check_digit(s)
        assert personnummer.is_valid(f"{s[:6]}-{s[6:]}")
        plant(f"{s[:6]}-{s[6:]}", "NATIONAL_ID", "id_se_personnummer", "en")
        p = f"{rng.randrange(50, 99)}{rng.randrange(1, 13):02d}{rng.randrange(1, 28):02d}"
        p += "".join(str(rng.randrange(10)) for _ in range(4))
        plant(p + pesel.calc_check_digit(p), "NATIONAL_ID", "id_pl_pesel", "en")
        ssn = f"{rng.randrange(1, 665):03d}-{rng.randrange(1, 99):02d}-{rng.randrange(1, 9999):04d}"
        plant(ssn, "NATIONAL_ID", "id_us_ssn", "en")

    OUT.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    formats = sorted({i["format"] for i in items})
    print(f"{len(items)} items in {len(formats)} formats -> {OUT}")


if __name__ == "__main__":
    main()
