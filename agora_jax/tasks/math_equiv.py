"""MATH-style answer equivalence: normalisation, structure (tuples, intervals, sets, matrices, +-),
then symbolic equivalence of scalars via sympy in a killable worker process (`sympy_worker`).

LaTeX is converted to sympy syntax by the small converter below (a whitelist of commands and
characters); model output is never passed to Python's `eval`.
"""

from __future__ import annotations

import re
from fractions import Fraction

from agora_jax.tasks.sympy_worker import SympyWorker

_WORKER = SympyWorker()

_REMOVE = ("\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\$", "$", "\\%", "%", "\u00b0")
_UNITS = (r"(?:degrees?|cm|mm|km|inches|inch|feet|foot|ft|yards?|meters?|miles?|units?|cents?|"
          r"dollars?|hours?|minutes?|seconds?|days?|sq(?:uare)?\s*\w+)")
_SUBS = (
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])\.?"), ""),
    (re.compile(r"(?<!\\)\\ "), ""),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ"), ""),
    (re.compile(r"\\(?:text|mbox|mathrm)\{\s[^{}]*\}(?:\^\{?\d\}?)?"), ""),  # "\text{ cm}^2": a unit
    (re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}"), r"\1"),
    (re.compile(rf"(?<=[\d}}])\s*{_UNITS}(?:\^\{{?\d\}}?)?\s*$"), ""),
    (re.compile(r"\s+(?![a-zA-Z])|(?<![a-zA-Z])\s+"), ""),  # keep one space only between letters
    (re.compile(r"\s+"), " "),
    (re.compile(r"\\frac(\d)(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\frac(\d)\{"), r"\\frac{\1}{"),
    (re.compile(r"\\frac\{([^{}]*)\}(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\sqrt(\d+|[a-zA-Z])"), r"\\sqrt{\1}"),
    (re.compile(r"_\{(\w+)\}"), r"_\1"),
    (re.compile(r"(?<![\d\w])\.(\d)"), r"0.\1"),
    (re.compile(r"^[a-zA-Z]\s*(?:=|\\in)(?!.*=)"), ""),  # "x = 5", "x \in [-2, 7]"
    (re.compile(r"^\(([A-Z])\)$"), r"\1"),  # "(C)" -> "C"
    (re.compile(r"\.$"), ""),
)
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MIXED = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_PLAIN = re.compile(r"-?(?:\d+(?:\.\d+)?|\\frac\{-?\d+\}\{\d+\}|\d+/\d+)")
_WORD = re.compile(r"[A-Za-z][A-Za-z ]+")
_MATRIX = re.compile(r"\\begin\{[pbvV]?matrix\}(.*)\\end\{[pbvV]?matrix\}")


def normalize_math(answer: str) -> str:
    """Canonical text of a MATH answer (Hendrycks-style rules plus a few more)."""
    s = answer.strip()
    for token in _REMOVE:
        s = s.replace(token, "")
    for pattern, replacement in _SUBS:
        s = pattern.sub(replacement, s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    mixed = _MIXED.fullmatch(s)  # "1\frac{4}{5}" is the mixed number 9/5
    if mixed and int(mixed.group(3)) < int(mixed.group(4)):
        sign, whole, num, den = mixed.groups()
        s = f"{sign}\\frac{{{int(whole) * int(den) + int(num)}}}{{{den}}}"
    return s.strip()


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Splits on `sep` outside (), [] and {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


def _wrapped(s: str) -> bool:
    """True when the bracket at s[0] closes at s[-1] (intervals may mix '(' and ']')."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return False
    depth = 0
    for i, ch in enumerate(s):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and i < len(s) - 1:
            return False
    return True


def _expand_pm(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if "\\pm" in item or "\\mp" in item:
            out += [item.replace("\\pm", "+", 1).replace("\\mp", "-", 1),
                    item.replace("\\pm", "-", 1).replace("\\mp", "+", 1)]
        else:
            out.append(item)
    return out


def _structure(s: str) -> tuple[str, list[str]]:
    """(kind, elements): kind is the bracket pair of a tuple/interval, or "" for a set/list/scalar."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "", _expand_pm(_split_top(s[2:-2]))
    if _wrapped(s) and len(_split_top(s[1:-1])) > 1:
        return s[0] + s[-1], _split_top(s[1:-1])
    return "", _expand_pm(_split_top(s))


def _plain_value(s: str) -> Fraction | None:
    if not _PLAIN.fullmatch(s):
        return None
    try:
        return Fraction(re.sub(r"\\frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s))
    except (ValueError, ZeroDivisionError):
        return None


def is_equiv(prediction: str | None, gold: str) -> bool:
    """True when the predicted MATH answer equals the gold one (normalised, structural, symbolic)."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(gold)
    return a == b or _equiv(a, b)


def _equiv(a: str, b: str) -> bool:
    if "\\cup" in a or "\\cup" in b:
        pa, pb = a.split("\\cup"), b.split("\\cup")
        return len(pa) == len(pb) and all(_equiv(x, y) for x, y in zip(pa, pb))
    ma, mb = _MATRIX.fullmatch(a), _MATRIX.fullmatch(b)
    if ma or mb:
        if not (ma and mb):
            return False
        rows_a, rows_b = ([r.split("&") for r in m.group(1).split("\\\\")] for m in (ma, mb))
        return [len(r) for r in rows_a] == [len(r) for r in rows_b] and all(
            _scalar_equiv(x, y) for ra, rb in zip(rows_a, rows_b) for x, y in zip(ra, rb))
    (kind_a, items_a), (kind_b, items_b) = _structure(a), _structure(b)
    if kind_a != kind_b or len(items_a) != len(items_b):
        return False
    if kind_a:  # tuples and intervals are ordered
        return all(_scalar_equiv(x, y) for x, y in zip(items_a, items_b))
    unmatched = list(items_b)
    for x in items_a:  # sets, lists of solutions and +- pairs are not
        match = next((y for y in unmatched if _scalar_equiv(x, y)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def _scalar_equiv(a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = _plain_value(a), _plain_value(b)
    if va is not None and vb is not None:
        return abs(va - vb) <= 1e-6 * max(abs(vb), 1)
    if _WORD.fullmatch(a) and _WORD.fullmatch(b):
        return a.casefold() == b.casefold()
    if a.count("=") != b.count("=") or a.count("=") > 1:
        return False
    sides = [s.split("=") for s in (a, b)]
    converted = [[latex_to_sympy(x) for x in side] for side in sides]
    if any(c is None for side in converted for c in side):
        return False
    ea, eb = (f"({side[0]})-({side[1]})" if len(side) == 2 else side[0] for side in converted)
    return _WORKER.equivalent(ea, eb, equation="=" in a)


# ---- LaTeX -> sympy syntax (whitelist) ----

_COMMANDS = {"pi": " pi ", "infty": " oo ", "cdot": "*", "times": "*", "div": "/", "ln": " log ",
             **{f: f" {f} " for f in ("sin", "cos", "tan", "cot", "sec", "csc", "log", "exp")}}
_FUNCTIONS = {"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "exp"}
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|[A-Za-z]+|\*\*|[-+*/()]|\s+|.")
_MAX_LEN = 400


def _group(s: str, i: int) -> tuple[str, int]:
    """The braced group (or single character) starting at s[i], and the index after it."""
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] == "{") - (s[j] == "}")
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise ValueError("unbalanced braces")


def _convert(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        command = re.match(r"\\([a-zA-Z]+)", s[i:])
        if command is None:
            out.append({"{": "(", "}": ")", "^": "**"}.get(s[i], s[i]))
            i += 1
            continue
        name, i = command.group(1), i + command.end()
        if name == "frac":
            num, i = _group(s, i)
            den, i = _group(s, i)
            out.append(f"(({_convert(num)})/({_convert(den)}))")
        elif name == "sqrt":
            index = re.match(r"\[([^\]]*)\]", s[i:])
            if index:
                i += index.end()
            arg, i = _group(s, i)
            power = f"(1/({_convert(index.group(1))}))" if index else "(1/2)"
            out.append(f"(({_convert(arg)})**{power})")
        elif name in _COMMANDS:
            out.append(_COMMANDS[name])
        else:
            raise ValueError(f"unsupported command \\{name}")
    return "".join(out)


def latex_to_sympy(latex: str) -> str | None:
    """Sympy-syntax text for a LaTeX expression, or None if it uses anything outside the whitelist."""
    try:
        converted = _convert(latex)
    except ValueError:
        return None
    tokens = []
    for token in _TOKEN.findall(converted):
        if token.isspace():
            continue
        if not re.fullmatch(r"\d+(?:\.\d+)?|\.\d+|[A-Za-z]+|\*\*|[-+*/()]", token):
            return None
        if token.isalpha() and token not in _FUNCTIONS | {"pi", "oo"}:
            tokens += ["I" if ch == "i" else ch for ch in token]  # "xy" is x*y; i is the imaginary unit
        else:
            tokens.append(token)
    out: list[str] = []
    for token in tokens:
        prev = out[-1] if out else ""
        if prev in _FUNCTIONS and token != "(":  # "cot x" -> cot(x)
            out += ["(", token, ")"]
            continue
        operand_end = prev == ")" or (prev[:1].isalnum() and prev not in _FUNCTIONS)
        if operand_end and (token == "(" or token[:1].isalnum()):  # "2x", "3(x+1)", "x y", ")("
            out.append("*")
        out.append(token)
    text = "".join(out)
    return text if 0 < len(text) <= _MAX_LEN else None
