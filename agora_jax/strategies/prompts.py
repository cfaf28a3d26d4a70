"""Prompts of the text strategies: short, plain, and all in the user turn (no system role needed),
so they work with chat models and with base models formatted as `User:` / `Assistant:`.

The answering prompts take the item's original chat messages: the question stays word for word (with
its answer-format instruction), the collaboration context is appended to the last user turn, and an
agent's own earlier answer is its own assistant turn (Du et al. 2023). The judge prompts (ranker,
verifier) show the bare question and ask for a one-word verdict.
"""

from __future__ import annotations

import re
from typing import Sequence

Message = dict[str, str]


def _with_user_suffix(messages: Sequence[Message], suffix: str) -> list[Message]:
    """`messages` with `suffix` appended to the last user turn."""
    out = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] = f"{out[last]['content']}\n\n{suffix}"
    return out


def _listing(answers: Sequence[str], label: str = "Answer") -> str:
    return "\n\n".join(f"{label} {i + 1}:\n{a.strip()}" for i, a in enumerate(answers))


# ---------------------------------------------------------------------- debate / refine


def _follow_up(messages: Sequence[Message], own: str, context: str) -> list[Message]:
    """The conversation so far (question, the agent's own answer) plus a new user turn."""
    return list(messages) + [{"role": "assistant", "content": own}, {"role": "user", "content": context}]


def debate(messages: Sequence[Message], own: str, others: Sequence[str]) -> list[Message]:
    """Du et al. round >= 2: the agent's previous answer, then the other agents' answers."""
    return _follow_up(messages, own, f"Other agents answered:\n\n{_listing(others, 'Agent')}\n\nUsing their "
                                     "reasoning as additional advice, examine your answer and theirs, and give an "
                                     "updated answer to the original question, in the same format.")


def refine(messages: Sequence[Message], own: str, others: Sequence[str]) -> list[Message]:
    """Multi-agent refinement: improve one's own previous answer given the other models' answers."""
    return _follow_up(messages, own, f"Other models answered:\n\n{_listing(others)}\n\nRefine your answer: fix "
                                     "any mistakes, keep what is right, and answer the original question again, in "
                                     "the same format.")


def synthesize(messages: Sequence[Message], answers: Sequence[str]) -> list[Message]:
    """Final answer (refine, MoA aggregator and later-layer proposers): one answer from many."""
    return _with_user_suffix(messages, f"Candidate answers from several models:\n\n{_listing(answers)}\n\n"
                                       "Some may be wrong. Critically evaluate them and write one correct, "
                                       "complete answer to the question, in the requested format.")


def fuse(messages: Sequence[Message], ranked: Sequence[str]) -> list[Message]:
    """LLM-Blender fuser: the top-ranked candidates, best first."""
    return _with_user_suffix(messages, f"Candidate answers, best first:\n\n{_listing(ranked)}\n\n"
                                       "Combine their strengths and fix their errors: write one final answer "
                                       "to the question, in the requested format.")


# ---------------------------------------------------------------------- judges

JUDGE_OPTIONS = ("A", "B")
VERDICTS = ("Yes", "No")


def judge_pair(question: str, answer_a: str, answer_b: str) -> list[Message]:
    """Pairwise ranker: which of two answers to `question` (without the task's answer-format
    instruction) is better; the reply is "A" or "B"."""
    return [{"role": "user", "content": f"Question:\n{question}\n\nAnswer A:\n{answer_a.strip()}\n\n"
                                        f"Answer B:\n{answer_b.strip()}\n\nWhich answer is more correct? Reply "
                                        "with one letter, A or B."}]


def verify(question: str, solution: str) -> list[Message]:
    """AGORA peer verifier: is a peer's solution to `question` correct; the reply is "Yes" or "No"."""
    return [{"role": "user", "content": f"Question:\n{question}\n\nProposed solution:\n"
                                        f"{solution.strip()}\n\nIs this solution correct? Reply with one word, "
                                        "Yes or No."}]


def first_option(text: str, options: Sequence[str]) -> int | None:
    """Index of the option a judge reply gives (its first word, case-insensitive), None if neither."""
    word = re.match(r"\W*(\w*)", text).group(1).lower()
    return next((i for i, o in enumerate(options) if word == o.lower()), None)
