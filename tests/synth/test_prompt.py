"""Reading teacher replies as LLMs write them, and what the teacher is asked."""

import pytest

from gptlab.synth.documents import Page
from gptlab.synth.extractive import ExtractiveTeacher, facts
from gptlab.synth.prompt import ReplyError, messages, parse_pairs

PAIRS = [("What is the limit?", "50,000 yuan"), ("How long do refunds take?", "3 days")]


@pytest.mark.parametrize("reply", [
    'Sure! Here are the pairs:\n```json\n{"pairs": [{"question": "What is the limit?", "answer": "50,000 yuan"},\n'
    '{"question": "How long do refunds take?", "answer": "3 days"},]}\n```\nLet me know if you need more.',
    '[{"q": "What is the limit?", "a": "50,000 yuan"}, {"q": "How long do refunds take?", "a": "3 days"}]',
    '<think>the page says 50,000 {not json</think>{"qa": [{"question": "What is the limit?", "answer": "50,000 yuan"}, '
    '{"question": "How long do refunds take?", "answer": "3 days"}]}',
    'Here you go: {"pairs": [{"问题": "What is the limit?", "答案": "50,000 yuan"}, '
    '{"问题": "How long do refunds take?", "答案": "3 days"}]} Hope this helps!',
])
def test_chatty_replies_parse(reply):
    assert parse_pairs(reply) == PAIRS


@pytest.mark.parametrize("reply", ["", "I cannot help with that.", '{"pairs": "none"}', '```json\n{"pairs": [\n```'])
def test_unreadable_replies(reply):
    with pytest.raises(ReplyError):
        parse_pairs(reply)


def test_prompt_asks_in_the_page_language_with_counts():
    zh = messages(Page("a.md", "转账", "个人账户单日转账限额为5万元。", "zh"), 15, 0.3)
    assert "15 个问答对" in zh[1]["content"] and "至少 5 个" in zh[1]["content"] and "中文" in zh[1]["content"]
    en = messages(Page("a.md", "Fees", "The fee is 8 yuan.", "en"), 10, 0.3)
    assert "Write 10 question-answer pairs" in en[1]["content"] and "At least 3" in en[1]["content"]
    assert "a.md (Fees)" in en[1]["content"]


def _form(fact, name):
    return next((q, a) for form, q, a in fact["forms"] if form == name)


def test_extractive_questions_in_both_languages():
    en = facts(Page("r.md", "Fees", "A fee of 0.5% applies to transfers above 10,000 yuan.", "en"))
    assert [_form(f, "what") for f in en] == [
        ("A fee of what percentage applies to transfers above 10,000 yuan?", "0.5%"),
        ("A fee of 0.5% applies to transfers above how many yuan?", "10,000 yuan")]
    assert _form(en[0], "cloze") == ("Fill in the blank: A fee of ___ applies to transfers above 10,000 yuan.", "0.5%")
    assert _form(en[1], "title") == ("Fees: A fee of 0.5% applies to transfers above ___ yuan.", "10,000")
    assert _form(en[1], "section")[0] == ('According to "Fees", a fee of 0.5% applies to transfers above how many '
                                          'yuan?')
    zh = facts(Page("r.md", "转账", "个人账户单日转账限额为5万元。退款在3个工作日内到账。", "zh"))
    assert [_form(f, "what") for f in zh] == [("个人账户单日转账限额为多少元？", "5万元"),
                                              ("退款在多少个工作日内到账？", "3个工作日")]
    assert _form(zh[0], "cloze") == ("填空：个人账户单日转账限额为____元。", "5万")  # 5万 = 50,000: the blank
    assert _form(zh[0], "section")[0] == "根据“转账”，个人账户单日转账限额为多少元？"
    assert _form(zh[1], "rule")[0] == "按照规定，退款在多少个工作日内到账？"
    copula = facts(Page("r.md", "Fees", "The monthly account fee is 12 yuan.", "en"))[0]
    assert _form(copula, "copula") == ("How many yuan is the monthly account fee?", "12 yuan")


def test_extractive_deals_facts_before_forms():
    page = Page("r.md", "Fees", "The fee is 8 yuan. The limit is 40 transfers per day.", "en")
    pairs = ExtractiveTeacher().ask([page], 3, 0.3)[0]
    assert [a for _, a in pairs] == ["8 yuan", "40 transfers", "8"]  # both facts' `what`, then the first cloze
    assert len(ExtractiveTeacher().ask([page], 100, 0.3)[0]) == 12  # six wordings of each


def test_units_are_a_word_and_a_plural_not_the_verb():
    page = Page("r.md", "Limits", "Transfers above 10,000 yuan need a code. Refunds take 3 business days. "
                "A borrower must be at least 22 years old.", "en")
    assert [f["answer"] for f in facts(page)] == ["10,000 yuan", "3 business days", "22 years"]
