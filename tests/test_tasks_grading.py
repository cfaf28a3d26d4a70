"""Answer extraction and grading on real benchmark items from ../shared/data, verdicts checked by hand.

Each case names an item (task, index in the unsplit test file), asserts its gold answer as read from
the file, then grades a model-style reply: correct paraphrases must pass, near misses must fail.
"""

from __future__ import annotations

import functools
import time

import pytest

from agora_jax.tasks import Example, extract_answer, get_task, grade, is_equiv, last_boxed, token_f1
from agora_jax.tasks.math_equiv import latex_to_sympy
from agora_jax.tasks.numeric import numbers_equal
from agora_jax.tasks.sympy_worker import SympyWorker


@functools.cache
def _items(task: str) -> list[Example]:
    return get_task(task, n_dev=0).test  # no dev carved out: index i is line/record i of the file


def item(task: str, index: int, gold: str) -> Example:
    example = _items(task)[index]
    assert example.answer == gold, f"{task}[{index}] gold is {example.answer!r}"
    return example


def verdict(example: Example, reply: str) -> bool:
    answer = extract_answer(reply, example.answer_type, example.choices)
    return grade(answer, example.answer, example.answer_type, example.choices) == 1.0


NUMERIC = [
    # gsm8k[0]: Janet's ducks, 16 - 3 - 4 = 9 eggs at $2
    ("gsm8k", 0, "18", "She sells 16 - 3 - 4 = 9 eggs.\n9 * 2 = 18\n#### 18", True),
    ("gsm8k", 0, "18", "So she makes $18.00 every day. The answer is $18.00.", True),
    ("gsm8k", 0, "18", "Janet earns \\boxed{18 \\text{ dollars}} per day.", True),
    ("gsm8k", 0, "18", "9 eggs are left and 9 * 2 = 18", True),  # no statement: last number
    ("gsm8k", 0, "18", "She eats 3 and bakes 4, 16 - 7 = 9... The answer is 16.", False),
    ("gsm8k", 0, "18", "First \\boxed{18}, but on reflection the total is \\boxed{20}.", False),
    ("gsm8k", 2, "70000", "The profit is \\boxed{\\$70,000}.", True),
    ("gsm8k", 2, "70000", "The answer is 70,000 dollars", True),
    ("gsm8k", 2, "70000", "The answer is 7,000", False),
    ("gsm8k", 489, "-10", "(-3 + 12 - 39) / 3 = -10. The answer is -10 degrees.", True),
    ("gsm8k", 489, "-10", "The answer is 10.", False),
    ("gsm8k", 611, "1450000", "Total cost: 1,450,000.\n#### 1,450,000", True),
    ("gsm8k", 611, "1450000", "Total cost: 1,450,001.\n#### 1,450,001", False),  # off by one: wrong at any size
    ("gsm8k", 796, "2880000", "The company has 2,880,000 employees. The answer is 2880000", True),
    ("gsm8k", 796, "2880000", "The answer is 2879999 employees.", False),
    ("mawps/addsub", 175, "0.6666666667", "0.1666 + 0.5 ... so \\boxed{\\frac{2}{3}}", True),
    ("mawps/addsub", 175, "0.6666666667", "The answer is 2/3 mile.", True),
    ("mawps/addsub", 175, "0.6666666667", "The answer is 0.67 mile.", False),  # rounded too far
    ("mawps/singleop", 457, "3.33333", "Each gets 10 / 3 = 3.333333 pounds. The answer is 3.333333", True),
    ("mawps/singleop", 457, "3.33333", "The answer is 3.3", False),
    ("mawps/addsub", 122, "9.43", "Joan spent $ 9.43 on video games.", True),
    ("mawps/addsub", 122, "9.43", "The answer is $9.34.", False),
    ("mawps/multiarith", 0, "39", "32 + 42 = 74 and 74 - 35 = 39 pieces", True),
    ("mawps/multiarith", 0, "39", "Final answer: 74", False),
    ("asdiv", 0, "9", "7 + 2 = 9. The answer is 9 apples.", True),
    ("asdiv", 29, "Mrs. Hilt", "Mrs. Hilt has 42 cents, Jacob 19. The answer is Mrs. Hilt.", True),
    ("asdiv", 29, "Mrs. Hilt", "The answer is Jacob.", False),
    ("asdiv", 849, "5:6", "15:18 simplifies to 5:6. The answer is 5:6", True),
    ("asdiv", 849, "5:6", "The answer is 6:5", False),
    ("asdiv", 165, "3:30 p.m.", "2:00 plus 1.5 hours. The answer is 3:30 pm.", True),
    ("asdiv", 165, "3:30 p.m.", "The answer is 3:00 p.m.", False),
]

# numbers_equal(prediction, gold): whole-number golds exactly, decimals and fractions up to float rounding
NUMBER_EQUALITY = [
    ("22090604", "22090603", False),  # the review's case: within 1e-6 of a large gold, still off by one
    ("22090603", "22090603", True),
    ("22,090,603", "22090603", True),
    ("-22090602", "-22090603", False),
    ("1000000001", "1000000000", False),
    ("1,000", "1000", True),
    ("1000", "1,000", True),
    ("18.00", "18", True),
    ("18.000001", "18", False),
    ("7e4", "70000", True),
    ("$70,000", "70000", True),
    ("50%", "50", True),
    ("9.43", "9.43", True),
    ("9.4300000001", "9.43", True),  # float rounding
    ("9.4301", "9.43", False),
    ("387.8502", "387.85", False),  # within 1e-6 of the gold, but not the gold's value
    ("12345.51", "12345.5", False),
    ("3.333333", "3.33333", True),  # a gold with >= 4 decimals is rounded: one unit of its last decimal
    ("3.3334", "3.33333", False),
    ("0.75", "3/4", True),
    ("3/4", "0.75", True),
    ("\\frac{3}{4}", "0.75", True),
    ("0.666666666667", "2/3", True),  # 2/3 as canonical answers write it (12 significant digits)
    ("0.6667", "2/3", False),
    ("the cat", "5", None),
]

MATH = [
    (0, "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
    (0, "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    (0, "\\left( 3, \\frac{\\pi}{2} \\right)", "\\left(\\frac{\\pi}{2}, 3\\right)", False),  # order matters
    (0, "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi)", False),
    (2, "\\frac{14}{3}", "\\dfrac{14}{3}", True),
    (2, "\\frac{14}{3}", "4\\frac{2}{3}", True),  # mixed number
    (2, "\\frac{14}{3}", "4.67", False),
    (7, "90^\\circ", "90", True),
    (7, "90^\\circ", "90 degrees", True),
    (7, "90^\\circ", "100^{\\circ}", False),
    (8, "3\\sqrt{13}", "\\sqrt{117}", True),  # radicals, via sympy
    (8, "3\\sqrt{13}", "3\\sqrt{12}", False),
    (15, "6 - 5i", "6-5i", True),
    (15, "6 - 5i", "6+5i", False),
    (25, "1,-2", "-2, 1", True),  # solutions: any order
    (25, "1,-2", "1", False),
    (96, "1 \\pm \\sqrt{19}", "1-\\sqrt{19}, 1+\\sqrt{19}", True),
    (96, "1 \\pm \\sqrt{19}", "1+\\sqrt{19}", False),
    (99, "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}", True),
    (99, "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} 1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", False),
    (103, "(3,4]", "(3, 4]", True),
    (103, "(3,4]", "(3,4)", False),  # interval ends matter
    (184, "(2,\\infty)", "(2, \\infty)", True),
    (184, "(2,\\infty)", "[2,\\infty)", False),
    (293, "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, 8/3]", True),
    (380, "(0,9) \\cup (9,36)", "(0, 9)\\cup(9, 36)", True),
    (380, "(0,9) \\cup (9,36)", "(0,36)", False),
    (4, "\\text{Evelyn}", "Evelyn", True),  # text answers
    (97, "\\text{east}", "\\text{East}", True),
    (97, "\\text{east}", "west", False),
    (227, "\\text{(C)}", "C", True),
    (227, "\\text{(C)}", "(D)", False),
    (198, "10,\\!080", "10080", True),
    (198, "10,\\!080", "1008", False),
    (242, "\\$32,\\!348", "32,348", True),
    (264, "1\\frac{4}{5}", "1.8", True),
    (264, "1\\frac{4}{5}", "\\frac{4}{5}", False),
    (166, "\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    (74, "\\cot x", "\\frac{\\cos x}{\\sin x}", True),  # symbolic
    (74, "\\cot x", "\\tan x", False),
    (102, "(a+5)(b+2)", "(b+2)(a+5)", True),
    (102, "(a+5)(b+2)", "(a+2)(b+5)", False),
    (179, "5x - 7y + 11z + 4 = 0", "-5x + 7y - 11z - 4 = 0", True),  # same plane
    (179, "5x - 7y + 11z + 4 = 0", "5x - 7y + 11z - 4 = 0", False),
    (422, "\\{1\\pm\\sqrt{5},-2\\}", "-2, 1+\\sqrt{5}, 1-\\sqrt{5}", True),
]

CHOICE = [
    # mmlu_stem[0]: controlling mosquitoes -> (C) reduce the carrying capacity
    ("mmlu_stem", 0, "C", "Lowering K limits the population. The answer is (C).", True),
    ("mmlu_stem", 0, "C", "Answer: C) reduce the carrying capacity", True),
    ("mmlu_stem", 0, "C", "The answer is reduce the carrying capacity cif the environment to lower the K value.", True),
    ("mmlu_stem", 0, "C", "(C) is right: lowering K is the lasting control.", True),  # leading letter
    ("mmlu_stem", 0, "C", "\\boxed{C}", True),
    ("mmlu_stem", 0, "C", "The answer is (D).", False),
    ("mmlu_stem", 0, "C", "(C) looks tempting but fails long term. The answer is (D).", False),
    ("mmlu_stem", 0, "C", "The answer is increase the mortality rate", False),
    ("mmlu_stem", 863, "B", "sqrt(18) = 3 sqrt(2), so the degree is 4. The answer is 4", True),  # option text
    ("mmlu_stem", 863, "B", "The answer is 2", False),
    ("mmlu_stem", 866, "B", "The answer is False, False", True),
    ("mmlu_stem", 866, "B", "The answer is True, False", False),
    ("bbh/date_understanding", 1, "A", "A month before 01/02/1987 is 12/02/1986. The answer is (A).", True),
    ("bbh/date_understanding", 1, "A", "The answer is 12/02/1986", True),
    ("bbh/date_understanding", 1, "A", "The answer is 12/01/1986", False),
    ("bbh/hyperbaton", 0, "A", "Order: size, age, color, origin. So the answer is A.", True),
    ("bbh/hyperbaton", 0, "A", "The answer is (B)", False),
    ("bbh/movie_recommendation", 0, "C", "The answer is The Lion King.", True),
    ("bbh/movie_recommendation", 0, "C", "The answer is (A) The Front Page", False),
    # movie_recommendation[163]: BBH's gold is the text "Monsters, Inc", which names no single option
    ("bbh/movie_recommendation", 163, "Monsters, Inc", "The answer is Monsters, Inc", True),
    ("bbh/movie_recommendation", 163, "Monsters, Inc", "The answer is (A)", False),
]

EXACT = [
    ("bbh/sports_understanding", 0, "no", "Lindholm is a hockey player... The answer is No.", True),
    ("bbh/sports_understanding", 0, "no", "The answer is yes", False),
    ("bbh/sports_understanding", 1, "yes", "yes", True),  # a short direct reply is the answer
    ("bbh/web_of_lies", 0, "No", "Elanor tells a lie, so the answer is: no", True),
    ("bbh/web_of_lies", 0, "No", "The answer is Yes.", False),
    ("bbh/formal_fallacies", 0, "invalid", "The conclusion does not follow. The answer is invalid.", True),
    ("bbh/formal_fallacies", 0, "invalid", "The answer is valid", False),
    ("bbh/causal_judgement", 2, "Yes", "The answer is \\boxed{Yes}", True),
    ("bbh/causal_judgement", 2, "Yes", "Final answer: No", False),
    ("bbh/dyck_languages", 1, "] ] >", "We close [ [ and <. The answer is ] ] >", True),
    ("bbh/dyck_languages", 1, "] ] >", "The answer is ]]>", True),
    ("bbh/dyck_languages", 1, "] ] >", "The answer is ] >", False),
    ("bbh/dyck_languages", 1, "] ] >", "The answer is > ] ]", False),
    ("bbh/word_sorting", 0, "syndrome therefrom", "s < t. The answer is syndrome therefrom", True),
    ("bbh/word_sorting", 0, "syndrome therefrom", "The answer is: Syndrome, therefrom.", True),
    ("bbh/word_sorting", 0, "syndrome therefrom", "The answer is therefrom syndrome", False),
]


@pytest.mark.parametrize("task,index,gold,reply,expected", NUMERIC + CHOICE + EXACT)
def test_grading_real_items(task, index, gold, reply, expected):
    assert verdict(item(task, index, gold), reply) is expected


@pytest.mark.parametrize("prediction,gold,expected", NUMBER_EQUALITY)
def test_numbers_equal(prediction, gold, expected):
    assert numbers_equal(prediction, gold) is expected
    if expected is not None:  # the same verdict through extraction and grading of a reply
        answer = extract_answer(f"The answer is {prediction}.", "number")
        assert grade(answer, gold, "number") == float(expected)


@pytest.mark.parametrize("index,gold,answer,expected", MATH)
def test_math_grading(index, gold, answer, expected):
    example = item("math500", index, gold)
    assert verdict(example, f"Working... so the result is $\\boxed{{{answer}}}$.") is expected


def test_case_counts():
    assert min(len(NUMERIC), len(MATH), len(CHOICE), len(EXACT)) >= 15


def test_extraction_patterns():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{\\left(1, \\frac{\\sqrt{3}}{2}\\right)}") == \
        "\\left(1, \\frac{\\sqrt{3}}{2}\\right)"
    assert last_boxed("\\fbox{42} then \\boxed{unclosed") == "42"
    assert last_boxed("so \\boxed 7.") == "7."
    assert extract_answer("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "math") == \
        "\\frac{3}{4}"
    assert extract_answer("#### 1,234", "number") == "1234"
    assert extract_answer("It costs 3/4 of a dollar. The answer is 3/4.", "number") == "0.75"
    assert extract_answer("**Answer:** 50%", "number") == "50"
    assert extract_answer("Answer: (B)", "choice", ("x", "y")) == "B"
    assert extract_answer("B\nBecause the other options fail.", "choice", ("x", "y")) == "B"


def test_no_answer_is_an_extraction_failure():
    assert extract_answer("I am not sure how to continue", "number") is None
    assert extract_answer("", "math") is None
    assert extract_answer(None, "exact") is None
    assert extract_answer("Let me think about it.\nThere are many cases here...", "exact") is None
    assert extract_answer("It is one of them.\nHard to tell really.", "choice", ("x", "y")) is None
    assert grade(None, "18", "number") == 0.0


def test_token_f1():
    assert token_f1("The Eiffel Tower", "eiffel tower") == 1.0
    assert token_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("London", "Paris") == 0.0
    example = Example("q", "Where?", [], "Paris", "f1")
    assert verdict(example, "The answer is Paris.")


def test_latex_converter_is_a_whitelist():
    assert latex_to_sympy("\\frac{\\sqrt{3}}{2}x") == "((((3)**(1/2)))/(2))*x"
    assert latex_to_sympy("2\\pi r") == "2*pi*r"
    for hostile in ["__import__('os').system('true')", "x.__class__", "\\input{/etc/passwd}", "lambda: 1"]:
        assert latex_to_sympy(hostile) is None
    assert not is_equiv("__import__('os').system('true')", "0")


def test_sympy_worker_timeout_kills_and_recovers():
    worker = SympyWorker(timeout_s=1.0)
    try:
        start = time.monotonic()
        assert worker.equivalent("9**9**9**9", "1") is False  # would run for ages
        assert time.monotonic() - start < 60  # killed, not left to run for ages (loose: busy machines restart slowly)
        assert worker.equivalent("(x+1)**2", "x**2+2*x+1") is True  # restarted
        assert worker.equivalent("sqrt(8)", "2*sqrt(2)") is True
        assert worker.equivalent("x", "x+1") is False
    finally:
        worker.close()
