"""The records every layer shares: transcript turns and their kinds, a strategy's result, and the
training example distillation consumes (docs/method.md §1).

    Turn(item_id, model, round, Role.DEBATE, prompt, output)   # one message of a collaboration
    DistillExample(item_id, messages, completion, targets=...)  # one (prompt, completion) to train on
    pair("2+2?", "4")                                           # a training example with no task item
    Result(answers, transcript, examples, info)                 # what `Strategy.run` returns

No dependency inside agora_jax: models, sampling, distill, strategies and the loop all read these.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Sequence

Message = dict[str, str]


class Role(enum.StrEnum):
    """What a transcript turn is: an answer to the item (possibly after reading others' answers) or a
    verdict about answers (`is_verdict`: a judgment, a ranking, a route), which no filter may count as
    an answer. A plain string in transcripts (`Role("answer") == "answer"`)."""

    ANSWER = "answer"  # a first answer
    DEBATE = "debate"  # an answer after reading the other agents' answers
    REFINE = "refine"  # an answer revised with the others' answers
    FINAL = "final"  # multiagent_refine's last answer
    PROPOSE = "propose"  # a mixture-of-agents proposer
    AGGREGATE = "aggregate"  # the MoA aggregator's answer
    FUSE = "fuse"  # an answer fused from ranked candidates, or from the pool's logits
    RANK = "rank"  # verdict: which of two candidates is better
    VERIFY = "verify"  # verdict: is a peer's solution right
    JUDGE = "judge"  # verdict: a judge's choice
    ROUTE = "route"  # verdict: the member a router sends the item to (its output is that name)
    SINGLE = "single"  # a member alone, in the evaluation
    CONTROL = "control"  # the compute-matched control's samples

    @property
    def is_verdict(self) -> bool:
        return self in (Role.RANK, Role.VERIFY, Role.JUDGE, Role.ROUTE)


@dataclasses.dataclass
class Turn:
    """One message of a collaboration transcript; `role` is a `Role` (a known string is turned into one,
    an unknown one is refused)."""

    item_id: str
    model: str
    round: int
    role: Role
    prompt: list[Message]
    output: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    logprobs: list[float] | None = None

    def __post_init__(self) -> None:
        self.role = Role(self.role)


@dataclasses.dataclass
class DistillExample:
    """A (prompt, completion) pair to train on; `targets` None means every pool member. `teacher` is
    whose next-token distribution logit KD matches on it (docs/method.md §1, method 3): None the fused
    pool, a member's name that member (it wrote the completion alone), the strategy's own name the
    model the strategy built (a merged model, `teacher_model`)."""

    item_id: str
    messages: list[Message]
    completion: str
    targets: tuple[str, ...] | None = None
    weight: float = 1.0
    source: str = "collaboration"
    teacher: str | None = None


@dataclasses.dataclass
class Result:
    """A strategy's run on one split: the final answer per item, every message, and the distillation
    data it proposes."""

    answers: list[str]
    transcript: list[Turn]
    examples: list[DistillExample]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def pair(prompt: str | Sequence[Message], completion: str, weight: float = 1.0) -> DistillExample:
    """A training example outside any task item: a plain-string prompt is one user message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return DistillExample("", messages, completion, weight=weight)
