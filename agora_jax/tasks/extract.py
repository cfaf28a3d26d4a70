"""Final-answer extraction from free-form model output.

Order: the last well-formed `\\boxed{}` / `\\fbox{}`, then the last "#### x" / "The answer is x" /
"Final answer: x" / "Answer: x" statement, then a fallback that depends on the answer type (last
number for numeric tasks, leading letter / option text / last "(X)" for multiple choice, the whole
reply when it is one short line for exact match). None means no answer could be found.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from agora_jax.tasks.numeric import find_numbers, format_number, parse_number

ANSWER_TYPES = ("number", "math", "choice", "exact", "f1")

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_STATEMENT = re.compile(
    r"(?:####|\b(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?)\s*(?P<answer>\S.*)", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)\.(?:\s|$)")
_LETTER = re.compile(r"^\(?([A-Z])(?:\)|(?=[.:,]|[ \t]*(?:\n|$)))")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")
_LETTER_PREFIX = re.compile(r"^(?:option|choice)\s+", re.IGNORECASE)
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$", re.MULTILINE)
_SHORT_REPLY = 100


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` (nested braces kept) or `\\boxed x`."""
    for m in reversed(list(_BOXED.finditer(text))):
        start = m.end()
        if text.startswith("{", start):
            depth = 0
            for i in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[start + 1 : i].strip()
        else:
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                return token.group(0)
    return None


def _tidy(candidate: str) -> str:
    """Strips markdown, math dollars, surrounding quotes and a final full stop."""
    t = candidate.strip().strip("*").strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "$\"'`":
        t = t[1:-1].strip()
    return t.rstrip(".").strip()


def final_statement(text: str) -> str | None:
    """The answer the reply states explicitly: last `\\boxed{}`, else the last answer statement."""
    boxed = _tidy(last_boxed(text) or "")
    if boxed:  # an empty \boxed{} states nothing
        return boxed
    statements = list(_STATEMENT.finditer(text))
    if not statements:
        return None
    line = statements[-1].group("answer")
    while (nested := _STATEMENT.match(line)) is not None:  # "Final Answer: The final answer is 5"
        line = nested.group("answer")
    boxed = last_boxed(line)
    answer = boxed if boxed is not None else _SENTENCE_END.split(line.replace("$", ""))[0]
    return _tidy(answer) or None


def parse_options(question: str) -> tuple[str, ...] | None:
    """Options listed in a question as lines "(A) text", "(B) text", ... (BBH style)."""
    found = _OPTION_LINE.findall(question)
    letters = [letter for letter, _ in found]
    if not found or letters != list(string.ascii_uppercase[: len(found)]):
        return None
    return tuple(text.strip() for _, text in found)


def _norm_option(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _letter(candidate: str, letters: str) -> str | None:
    m = _LETTER.match(_LETTER_PREFIX.sub("", _TEXT.sub(r"\1", candidate).strip().strip("*")))
    return m.group(1) if m and m.group(1) in letters else None


def _option_by_text(candidate: str, choices: Sequence[str] | None) -> str | None:
    """Letter of the option whose text the candidate states (exactly, else the only one it contains)."""
    if not choices:
        return None
    target = _norm_option(candidate)
    normed = [_norm_option(c) for c in choices]
    for i, option in enumerate(normed):
        if option and option == target:
            return string.ascii_uppercase[i]
    contained = [i for i, option in enumerate(normed) if option and f" {option} " in f" {target} "]
    return string.ascii_uppercase[contained[0]] if len(contained) == 1 else None


def _extract_choice(text: str, choices: Sequence[str] | None) -> str | None:
    letters = string.ascii_uppercase[: len(choices)] if choices else string.ascii_uppercase
    candidate = final_statement(text)
    if candidate is not None:
        found = _letter(candidate, letters) or _option_by_text(candidate, choices)
        if found:
            return found
    lines = [line for line in text.strip().splitlines() if line.strip()]
    found = _letter(text, letters) or (_option_by_text(lines[-1], choices) if lines else None)
    if found:
        return found
    loose = [letter for letter in _PAREN_LETTER.findall(text) if letter in letters]
    return loose[-1] if loose else candidate


def _extract_number(text: str) -> str | None:
    candidate = final_statement(text)
    if candidate is not None:
        value = parse_number(candidate)
        return format_number(value) if value is not None else candidate
    numbers = find_numbers(text)
    return format_number(float(numbers[-1])) if numbers else None


def _short_reply(text: str) -> str | None:
    t = _tidy(text)
    return t if t and "\n" not in t and len(t) <= _SHORT_REPLY else None


def extract_answer(
    text: str | None, answer_type: str = "exact", choices: Sequence[str] | None = None
) -> str | None:
    """The final answer in a model reply, normalised for `answer_type`; None if there is none.

    number -> canonical number text ("1,000.50" -> "1000.5") or the stated text when not numeric;
    choice -> option letter ("B") when one can be identified; math/exact/f1 -> the stated answer.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
    if not text or not text.strip():
        return None
    if answer_type == "number":
        return _extract_number(text)
    if answer_type == "choice":
        return _extract_choice(text, choices)
    candidate = final_statement(text)
    if candidate is not None or answer_type == "math":
        return candidate
    return _short_reply(text) if answer_type == "exact" else _tidy(text) or None
