"""Graders: an extracted answer against the gold answer, as a score in [0, 1]."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from agora_jax.tasks.extract import ANSWER_TYPES
from agora_jax.tasks.math_equiv import is_equiv
from agora_jax.tasks.numeric import find_numbers, numbers_equal, parse_number

_BRACKETS_ONLY = re.compile(r"[()\[\]{}<>\s]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    """Case, whitespace, commas, quotes, a final full stop and "(A)" vs "A" do not matter."""
    t = re.sub(r"\\text\{([^{}]*)\}", r"\1", text).strip().lower().replace(",", " ")
    t = re.sub(r"(?<=[a-z])\.", "", " ".join(t.split())).strip("\"'`*").rstrip(".").strip()  # p.m. = pm
    if _BRACKETS_ONLY.fullmatch(t):  # dyck sequences: "] ) >" == "])>"
        return t.replace(" ", "")
    letter = re.fullmatch(r"\(([a-z])\)", t)
    return letter.group(1) if letter else t


def exact_match(prediction: str, gold: str) -> bool:
    """Normalised string equality; numbers compare by value ("10,000" == "10000")."""
    same_number = numbers_equal(prediction, gold)
    return same_number if same_number is not None else normalize_text(prediction) == normalize_text(gold)


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 (lowercase, no punctuation or articles)."""
    def tokens(s: str) -> list[str]:
        s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
        return _ARTICLES.sub(" ", s).split()

    p, g = tokens(prediction), tokens(gold)
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def choice_match(prediction: str, gold: str, choices: Sequence[str] | None = None) -> bool:
    """Same option: letters compare as letters, otherwise option texts compare normalised."""
    letters = string.ascii_lowercase[: len(choices)] if choices else string.ascii_lowercase
    p, g = normalize_text(prediction), normalize_text(gold)
    if len(p) == 1 and len(g) == 1 and p in letters and g in letters:
        return p == g

    def as_text(answer: str) -> str:
        if choices and len(answer) == 1 and answer in letters:
            return normalize_text(choices[letters.index(answer)])
        return answer

    return as_text(p) == as_text(g)


def grade(
    answer: str | None, gold: str, answer_type: str = "exact", choices: Sequence[str] | None = None
) -> float:
    """Score of an extracted answer (None = no answer = 0) against the gold answer."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
    if answer is None:
        return 0.0
    if answer_type == "number":
        numbers = find_numbers(answer)
        if parse_number(gold) is not None and parse_number(answer) is None and len(numbers) == 1:
            answer = numbers[0]  # "she earned $10 in total" states one number
        return float(exact_match(answer, gold))
    if answer_type == "math":
        return float(is_equiv(answer, gold))
    if answer_type == "choice":
        return float(choice_match(answer, gold, choices))
    if answer_type == "exact":
        return float(exact_match(answer, gold))
    return token_f1(answer, gold)
