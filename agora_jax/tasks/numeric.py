"""Numbers as people and models write them: 1,234  $5  50%  3/4  \\frac{3}{4}  18 apples."""

from __future__ import annotations

import re

NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_LEADING_NUMBER = re.compile(rf"^({NUMBER})(?:\s*/\s*({NUMBER}))?")
# A sign counts only when it does not follow a digit, letter or ')': "5-3" holds 5 and 3, not -3.
_ANY_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{\s*([-+]?[\d.]+)\s*\}\{\s*([-+]?[\d.]+)\s*\}")
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}")
_WHOLE = re.compile(r"[-+]?\d+")
_DROP = ("\\$", "$", "\\%", "%", "\\!", "\\,", "**")


def clean_number_text(text: str) -> str:
    """Removes currency, percent, thousands separators and LaTeX wrappers around numbers."""
    t = _TEXT.sub(r"\1", text.strip().replace("\u2212", "-"))
    t = _LATEX_FRAC.sub(r"\1/\2", t)
    for token in _DROP:
        t = t.replace(token, "")
    return _THOUSANDS.sub("", t).strip()


def parse_number(text: str) -> float | None:
    """The value of `text` when it is one number (or a/b) followed at most by words such as units."""
    t = clean_number_text(text)
    m = _LEADING_NUMBER.match(t)
    if m is None or re.search(r"\d", t[m.end():]):  # "5:6", "3:30 pm", "2 and 3" are not one number
        return None
    value = float(m.group(1))
    if m.group(2) is None:
        return value
    denominator = float(m.group(2))
    return value / denominator if denominator else None


def find_numbers(text: str) -> list[str]:
    """Every number written in free text, in order."""
    return _ANY_NUMBER.findall(clean_number_text(text))


def format_number(value: float) -> str:
    """Canonical text of a number: integers without '.0', others with 12 significant digits."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g")


def decimals(text: str) -> int:
    """How many digits follow the decimal point in `text` (0 if none)."""
    m = re.search(r"\.(\d+)", clean_number_text(text))
    return len(m.group(1)) if m else 0


def _is_whole_number(text: str) -> bool:
    """True when `text` states a number without decimals, fraction or exponent ("1,000", "-10 m")."""
    m = _LEADING_NUMBER.match(clean_number_text(text))
    return m is not None and m.group(2) is None and _WHOLE.fullmatch(m.group(1)) is not None


def numbers_equal(prediction: str, gold: str) -> bool | None:
    """Numeric equality; None when either side is not a number.

    A whole-number gold ("18", "1,000", "22090603") is matched exactly: an answer off by one is wrong
    however large the gold. A gold with decimals or a fraction is matched up to float rounding
    (relative 1e-9; answers are canonicalised with 12 significant digits, 2/3 as 0.666666666667), so
    12345.51 is not 12345.5. A gold written with >= 4 decimals is a rounded value (mawps stores 10/3
    as 3.33333): a prediction within one unit of its last decimal also counts.
    """
    p, g = parse_number(prediction), parse_number(gold)
    if p is None or g is None:
        return None
    if _is_whole_number(gold):
        return p == g
    tolerance = max(1e-9 * abs(g), 1e-12)
    if decimals(gold) >= 4:
        tolerance = max(tolerance, 10.0 ** -decimals(gold))
    return abs(p - g) <= tolerance
