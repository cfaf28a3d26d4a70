"""The README's Python blocks run as written: the API example on tiny models, and the example strategy
(one module + one registry line) registered and run on the same pool."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import jax

from agora_jax.records import Role
from agora_jax.strategies import STRATEGIES, make_strategy

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_api_example_and_example_strategy_run():
    api, strategy = python_blocks()
    assert "Pool(" in api and "@register" in strategy
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(api, "README.md (Python API)", "exec"), scope)
    accuracy, turns, examples = out.getvalue().split()
    assert 0 < int(turns) and 0 < int(examples) and float(accuracy) == scope["evaluate"](
        scope["result"].answers, scope["task"], "test").accuracy
    pool, task = scope["pool"], scope["task"]
    assert pool.first_copies() == [0, 1, 0]  # m2 took m0's weights
    try:
        module: dict = {}
        exec(compile(strategy, "README.md (Extending)", "exec"), module)
        result = make_strategy(module["defaults"]()).run(pool, task, "dev", jax.random.key(0))
        items = task.split("dev")
        assert [t.item_id for t in result.transcript] == [ex.id for ex in items]
        assert {t.model for t in result.transcript} == {"m0"} and {t.role for t in result.transcript} == {Role.ANSWER}
        assert result.answers == [t.output for t in result.transcript]
    finally:
        STRATEGIES.pop("first_member", None)
