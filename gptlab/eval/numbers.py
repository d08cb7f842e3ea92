"""Numbers in free text, for strict QA scoring: every number of the reference must appear in the answer.

`extract_numbers(text)` reads the numbers a reader would see, after normalising how they are written:

- full-width forms (１２３, ％, －) through Unicode NFKC; the Unicode minus sign (U+2212) as "-";
- thousands separators: "1,000" == "1000" (a comma counts as a separator only before exactly three digits,
  so "1,2,3" is three numbers);
- decimals by value: "3.50" == "3.5" (compared as Decimal, not as floats);
- percentages by value as a fraction: "5%" == "5 percent" == "百分之五" == "0.05"; "5%" != "5";
- scale words after a number: "1.2 million" == "1,200,000", "3k" == "3000", "1.2万" == "12000",
  "3千万" == "30000000";
- Chinese numerals: "一百" == 100, "三千五百" == 3500, "一百零五" == 105, "三万五" == 35000 (colloquial:
  a trailing digit counts in the next lower unit), "二〇二四" == 2024, "一点五" == 1.5, "负三" == -3,
  financial forms (壹贰叁 拾佰仟) too;
- negative numbers: a "-" is a sign only when no letter, digit or closing bracket precedes it, so
  "-5" is negative but "GPT-4", "2024-01-05" and "1990-2000" hold no negative numbers.

Decisions (documented in docs/eval.md, tested in tests/test_eval_numbers.py):

- Digits glued to a preceding letter are part of a name, not a number: "H2O", "mp3", "B2B" hold none;
  digits followed by letters are numbers: "3rd" -> 3, "5kg" -> 5, "10am" -> 10.
- Dates and times are read number by number: "2024-01-05" -> 2024, 1, 5; "3:30" -> 3, 30.
- A lone "一" is read as 1 only after 第 ("第一"), before 点 ("一点五"), or as the whole text; elsewhere it
  is mostly the article "a" ("一个问题") or part of a word ("一起", "唯一"). "十分" ("very") is not 10.
- English number words ("five") are not read: "one" is far more often a pronoun than a number.
- Extra numbers in the answer are allowed; a number repeated in the reference needs to appear once.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# ---------------------------------------------------------------------------------------------------------
# Chinese numerals -> Arabic, before the Arabic numbers are read

_CN_DIGITS = {
    "零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9,
    "壹": 1, "贰": 2, "貳": 2, "叁": 3, "參": 3, "肆": 4, "伍": 5, "陆": 6, "陸": 6, "柒": 7, "捌": 8, "玖": 9,
}
_CN_SMALL = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
_CN_BIG = {"万": 10**4, "萬": 10**4, "亿": 10**8, "億": 10**8}
_CN_UNITS = {**_CN_SMALL, **_CN_BIG}
_D = "".join(_CN_DIGITS)
_U = "".join(_CN_UNITS)

# an optional sign and percent prefix, then a run that starts with a digit or 十 ("十五" = 15), with an
# optional fractional part after 点
_CN_RUN = re.compile(rf"(负)?(百分之)?([{_D}十拾][{_D}{_U}]*(?:点[{_D}]+)?)")
# an Arabic number followed by Chinese units: "1.2万", "3千万", "5百"
_ARABIC_CN_UNIT = re.compile(rf"(?<![\d.,])(\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|\d+(?:\.\d+)?)([{_U}]+)")


def _cn_integer(s: str) -> int:
    """Value of a Chinese integer: digits with units ("三千五百", "一亿五千万"), or bare digits ("二〇二四")."""
    if not any(c in _CN_UNITS for c in s):
        return int("".join(str(_CN_DIGITS[c]) for c in s))
    yi = wan = section = number = 0  # the parts counted in 亿 (10^8), in 万 (10^4), below 万, the last digit
    for c in s:
        if c in _CN_DIGITS:
            number = _CN_DIGITS[c]
        elif c in _CN_SMALL:
            section += (number or 1) * _CN_SMALL[c]  # "十五": a unit without a digit counts once
            number = 0
        elif _CN_BIG[c] == 10**4:
            wan, section, number = (section + number) * 10**4, 0, 0
        else:
            yi, wan, section, number = (yi + wan + section + number) * 10**8, 0, 0, 0
    if number and len(s) >= 2 and s[-2] in _CN_UNITS:
        number *= _CN_UNITS[s[-2]] // 10  # colloquial "三万五" = 35000, "一千五" = 1500 ("十五" unchanged)
    return yi + wan + section + number


def _cn_run_value(run: str) -> str:
    whole, _, frac = run.partition("点")
    value = str(_cn_integer(whole))
    if frac:
        value += "." + "".join(str(_CN_DIGITS[c]) for c in frac)
    return value


def _replace_chinese(text: str) -> str:
    def arabic_unit(m: re.Match) -> str:
        value = Decimal(m.group(1).replace(",", ""))
        for c in m.group(2):
            value *= _CN_UNITS[c]
        return _plain(value)

    text = _ARABIC_CN_UNIT.sub(arabic_unit, text)

    def run(m: re.Match) -> str:
        sign, percent, body = m.group(1), m.group(2), m.group(3)
        before = text[m.start() - 1] if m.start() else ""
        after = text[m.end()] if m.end() < len(text) else ""
        if body == "一" and not (before == "第" or m.group(0) == text.strip() or sign or percent):
            return m.group(0)  # "一个", "一起", "唯一": the article or part of a word, not the number 1
        if body == "十" and after == "分" and not (sign or percent):
            return m.group(0)  # "十分" is the adverb "very"
        value = _cn_run_value(body)
        # spaces keep a converted number apart from neighbouring digits ("第3" stays "第 3")
        return f" {'-' if sign else ''}{value}{'%' if percent else ''} "

    return _CN_RUN.sub(run, text)


# ---------------------------------------------------------------------------------------------------------
# Arabic numbers

_SCALES = {
    "hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12,
    "k": 10**3, "mn": 10**6, "m": 10**6, "bn": 10**9, "b": 10**9,
}
_NUMBER = re.compile(
    r"(?P<sign>(?<![A-Za-z0-9)\]])-)?"  # a sign, unless a word, number or bracket precedes ("GPT-4", "1-2")
    r"(?<![A-Za-z0-9.])"  # not inside a name ("H2O", "mp3") or another number ("1.2.3")
    r"(?P<body>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+(?![A-Za-z]))?"
    r"(?:\s*(?P<word>(?i:hundred|thousand|million|billion|trillion))\b"  # "1.2 million"
    r"|(?P<suffix>k|K|M|mn|B|bn)(?![A-Za-z]))?"  # "3k", "$5M", "1.2bn"
    r"(?P<pct>\s*(?:%|(?i:percent|per\s+cent|pct)\b))?"
)


@dataclass(frozen=True)
class Number:
    """A number as read from text: its value (a percentage as a fraction) and how it was written."""

    value: Decimal
    text: str

    def equals(self, other: "Number", rel_tol: float = 0.0) -> bool:
        if rel_tol == 0:
            return self.value == other.value
        scale = max(abs(self.value), abs(other.value))
        return abs(self.value - other.value) <= Decimal(str(rel_tol)) * scale


def _plain(value: Decimal) -> str:
    """Decimal -> digits without exponent or trailing zeros ("12000", "1.5")."""
    return format(value.normalize(), "f")


def normalize_text(text: str) -> str:
    """NFKC (full-width digits, ％, －), the Unicode minus as "-", and Chinese numerals as Arabic."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    return _replace_chinese(text)


def extract_numbers(text: str) -> list[Number]:
    """Every number in `text`, in order (see the module docstring for what counts)."""
    out = []
    norm = normalize_text(text)
    for m in _NUMBER.finditer(norm):
        body = m.group("body").replace(",", "")
        try:
            value = Decimal(body + (m.group("exp") or ""))
        except InvalidOperation:  # pragma: no cover - the pattern only admits valid literals
            continue
        scale = m.group("word") or m.group("suffix")
        if scale:
            value *= _SCALES[scale.lower()]
        if m.group("pct"):
            value /= 100
        if m.group("sign"):
            value = -value
        out.append(Number(value, m.group(0).strip()))
    return out


def numbers_match(reference: str, answer: str, rel_tol: float = 0.0) -> bool:
    """True when every number in `reference` appears in `answer` with the same value (extra ones allowed).

    A reference without numbers matches trivially; callers decide what that means (qa.py reports numeric
    accuracy only over references that hold a number).
    """
    found = extract_numbers(answer)
    return all(any(r.equals(a, rel_tol) for a in found) for r in extract_numbers(reference))
