"""Strict number matching for QA: the tricky ways the same number is written, and the decisions taken.

Each case states (reference, answer, should the answer count as giving the reference's numbers).
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from gptlab.eval.numbers import extract_numbers, numbers_match


def values(text: str) -> list[Decimal]:
    return [n.value for n in extract_numbers(text)]


SAME = [
    ("1,000", "1000"),  # thousands separator
    ("1,234,567.5", "1234567.50"),
    ("3.50", "3.5"),  # trailing zeros
    ("0.5", ".5"),
    ("5%", "0.05"),  # decision: a percentage is its fraction
    ("5%", "5 percent"),
    ("5%", "５％"),  # full-width digits and percent sign
    ("百分之五", "5%"),
    ("12.5%", "0.125"),
    ("一百", "100"),
    ("三千五百", "3500"),
    ("一百零五", "105"),
    ("十五", "15"),
    ("两千", "2000"),
    ("三万五", "35000"),  # colloquial: the trailing digit is thousands
    ("一亿五千万", "150,000,000"),
    ("1.2万", "12000"),
    ("3千万", "30,000,000"),
    ("一点五", "1.5"),
    ("负三", "-3"),
    ("壹佰贰拾叁", "123"),  # financial numerals
    ("二〇二四年", "2024"),  # digit-by-digit year
    ("第一", "1"),
    ("１２３", "123"),  # full-width digits
    ("-5", "−5"),  # Unicode minus sign
    ("1.2 million", "1,200,000"),
    ("$3M", "3000000"),
    ("3k", "3,000"),
    ("1e3", "1000"),
    ("3rd", "3"),  # ordinal suffix
    ("5kg", "5 kilograms"),  # unit glued to the number
    ("2024-01-05", "2024年1月5日"),  # dates are read number by number, so both forms agree
]

DIFFERENT = [
    ("5%", "5"),  # decision: 5% is 0.05, not 5
    ("-5", "5"),  # the sign matters
    ("3.5", "35"),
    ("1,000", "1"),
    ("1,2,3", "123"),  # a comma before fewer than three digits separates numbers
    ("1000", "100"),
    ("2024-01-05", "January 5, 2024"),  # month names are not read as numbers
]


@pytest.mark.parametrize("reference,answer", SAME)
def test_same_value_written_differently_matches(reference, answer):
    assert numbers_match(reference, answer), (values(reference), values(answer))
    assert numbers_match(answer, reference), "the match is symmetric for single numbers"


@pytest.mark.parametrize("reference,answer", DIFFERENT)
def test_different_values_do_not_match(reference, answer):
    assert not numbers_match(reference, answer), (values(reference), values(answer))


def test_extra_numbers_in_the_answer_are_allowed_but_every_reference_number_is_required():
    assert numbers_match("It cost 42 dollars", "After 3 tries it cost 42 dollars in 2019")
    assert not numbers_match("between 3 and 7", "at least 3")
    assert numbers_match("3 and 3", "3")  # a repeated reference number needs to appear once


def test_hyphens_between_words_or_numbers_are_not_minus_signs():
    assert values("GPT-4") == [4]
    assert values("1990-2000") == [1990, 2000]
    assert values("from -3 to -1") == [-3, -1]
    assert values("x=-7, (-2)") == [-7, -2]


def test_digits_inside_names_are_not_numbers():
    assert values("H2O and mp3 and B2B") == []
    assert values("version 1.2.3") == [Decimal("1.2")]  # the rest is not a separate number


def test_chinese_words_that_contain_numerals_are_not_numbers():
    assert values("这是一个问题") == []  # 一个: the article "a"
    assert values("我们一起去") == []
    assert values("唯一的答案") == []
    assert values("这十分重要") == []  # 十分: "very"
    assert values("一") == [1]  # the whole text is the numeral


def test_numbers_are_read_in_order_with_their_values():
    assert values("共有三千五百元，增长了百分之十二点五") == [3500, Decimal("0.125")]
    assert values("Revenue rose 12% to $1.2 billion in Q3 2023") == [Decimal("0.12"), Decimal("1.2e9"), 2023]


def test_a_reference_without_numbers_matches_trivially():
    assert numbers_match("Paris", "It is London")


def test_relative_tolerance_is_opt_in():
    assert not numbers_match("3.14159", "3.1416")
    assert numbers_match("3.14159", "3.1416", rel_tol=1e-4)
