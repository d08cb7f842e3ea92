"""`--teacher extractive`: question-answer pairs built from the sentences that state numbers; no network, no LLM.

For every number written in digits in a sentence ("50,000 yuan", "0.5%", "5万元", "3 business days"),
questions in several wordings, each with that number (and its unit) as the answer: several wordings of
each fact is what lets a fine-tuned model answer a wording it has not seen (Allen-Zhu & Li 2023, "Physics
of Language Models 3.1": knowledge augmentation).

    what     the number asked for in place      "The daily limit is how many yuan?"  "单日转账限额为多少元？" (5万元)
    cloze    the number blanked out             "Fill in the blank: The daily limit is ___ yuan."  (answer 50,000)
    copula   "X is N": the question word first  "How many yuan is the daily limit?"  (English only)
    section  `what` after its section's title   'According to "Transfers", the daily limit is how many yuan?'
    title    the section's title, then the blank "Transfers: The daily limit is ___ yuan."
    rule     `what` after "Under the rules,"     "Under the rules, the daily limit is how many yuan?"

synth qa's near-duplicate filter drops the wordings too close to another (long sentences, short prefixes).
Pairs are dealt out fact by fact, form by form (every number's `what` first), up to the pairs asked per
page. Numbers written in words or Chinese numerals are left alone: blanking them reliably needs a parser.
"""

from __future__ import annotations

import re

from gptlab.synth.documents import Page

_SENTENCE = re.compile(r"(?:[^.!?。！？；\n]|\.(?=\d))*(?:\.(?!\d)|[!?。！？；]|\n|$)")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_EN_SCALE = re.compile(r"\s?(?:%|percent\b|per cent\b|million\b|billion\b|thousand\b)", re.I)
_COPULA = re.compile(r"(.+?)\s+(is|are|was|were)\s+", re.S)
_EN_UNIT_WORD = re.compile(r"\s([a-z][a-z-]*)")
_EN_STOP = set("and or to of for per in on at the a an is are be by from with after before within than as if "
               "each every when while this that which who plus minus".split())
_ZH_UNITS = set("元角分块美欧镑日天周月年岁个次笔倍人家张份项条小时钟秒工作户位名套件台辆亩米公里斤克吨")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _scale_end(sentence: str, end: int, zh: bool) -> int:
    """Where the number's scale ends: "%", "million", "万" are part of its value (5万 = 50000)."""
    m = _EN_SCALE.match(sentence, end)
    if m:
        return m.end()
    while zh and end < len(sentence) and sentence[end] in "%万亿千百":
        end += 1
    return end


def _unit_end(sentence: str, end: int, zh: bool) -> int:
    """Where the unit after the number ("yuan", "business days", "元", "个工作日") ends."""
    if zh:
        start = end
        while end < len(sentence) and end - start < 4 and sentence[end] in _ZH_UNITS:
            end += 1
        return end
    for i in range(2):  # a lower-case word that is not a function word, then a plural: "business days"
        w = _EN_UNIT_WORD.match(sentence, end)
        if not w or w.group(1) in _EN_STOP or (i == 1 and not w.group(1).endswith("s")):
            break  # "10,000 yuan need a code": "need" is the verb, not the unit
        end = w.end()
    return end


def _title(page: Page) -> str:
    return page.where.split(" (part ")[0]


def facts(page: Page) -> list[dict[str, str]]:
    """One entry per number in a sentence: its questions as (form, question, answer), in the order dealt."""
    zh = page.language == "zh"
    out = []
    for s in _sentences(page.text):
        body = s.rstrip(".!?。！？；\n ")
        if len(body) < 6 or body.startswith("#"):
            continue
        for m in _NUMBER.finditer(body):
            scale = _scale_end(body, m.end(), zh)
            stop = scale if scale > m.end() and not body[scale - 1].isalpha() else _unit_end(body, scale, zh)
            number, unit = body[m.start(): scale], body[scale: stop]
            before, after = body[: m.start()], body[stop:]
            answer = (number + unit).strip()
            percent = number.endswith("%") or "cent" in number
            title = _title(page)
            if zh:
                what = f"{before}多少{unit}{after}？"
                blank = f"{before}____{unit}{after}。"
                forms = [("what", what, answer), ("cloze", f"填空：{blank}", number),
                         ("section", f"根据“{title}”，{what}", answer), ("title", f"{title}：{blank}", number),
                         ("rule", f"按照规定，{what}", answer)]
            else:
                ask = ("what percentage" if percent else f"how many {unit.strip()}" if unit.strip() else "what number")
                what = f"{before}{ask}{after}?"
                what, lower = what[0].upper() + what[1:], what[0].lower() + what[1:]
                blank = f"{before}___{unit}{after}."
                forms = [("what", what, answer), ("cloze", f"Fill in the blank: {blank}", number)]
                copula = _COPULA.fullmatch(before)
                if copula:  # "X is 50,000 yuan" -> "How many yuan is x?"
                    subject = copula.group(1)
                    forms.append(("copula", f"{ask[0].upper() + ask[1:]} {copula.group(2)} "
                                            f"{subject[0].lower() + subject[1:]}{after}?", answer))
                forms += [("section", f'According to "{title}", {lower}', answer), ("title", f"{title}: {blank}", number),
                          ("rule", f"Under the rules, {lower}", answer)]
            out.append({"forms": forms, "answer": answer, "number": number})
    return out


class ExtractiveTeacher:
    """The teacher interface (`ask`, `stats`) without a model."""

    def __init__(self) -> None:
        from gptlab.synth.teacher import TeacherStats

        self.stats = TeacherStats()

    def ask(self, pages: list[Page], n_pairs: int, numeric_share: float,
            progress: bool = True) -> list[list[tuple[str, str]]]:
        out = []
        for page in pages:
            found = facts(page)
            depth = max((len(f["forms"]) for f in found), default=0)
            pairs = [f["forms"][k][1:] for k in range(depth) for f in found if k < len(f["forms"])]
            out.append(pairs[:n_pairs])
        return out
