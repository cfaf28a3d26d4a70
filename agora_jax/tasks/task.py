"""Example and Task: what the rest of agora_jax sees of a benchmark."""

from __future__ import annotations

import dataclasses

import grain

from agora_jax.tasks.splits import check_disjoint

Message = dict[str, str]

INSTRUCTIONS = {
    "number": "Solve the problem step by step, then give the final answer as a number in \\boxed{}.",
    "math": "Solve the problem step by step, then give the final answer in \\boxed{}.",
    "choice": 'Think step by step, then finish with "The answer is (X)", where X is the letter of the '
              "correct option.",
    "exact": 'Think step by step, then finish with "The answer is X", where X is your final answer.',
    "f1": 'Answer the question, then finish with "The answer is X".',
}


def build_messages(
    question: str, answer_type: str, instruction: str | None = None, system_prompt: str | None = None
) -> list[Message]:
    """Chat messages for one item: optional system message, then the question and the instruction
    on how to state the final answer (default per answer type; "" for none)."""
    instruction = INSTRUCTIONS[answer_type] if instruction is None else instruction
    content = f"{question}\n\n{instruction}" if instruction else question
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": content}]


@dataclasses.dataclass(frozen=True)
class Example:
    """One item: chat `messages` to send, gold `answer` (canonical: option letter for choice tasks),
    the `answer_type` that selects extractor and grader, a reference `solution` when known, and the
    question's `group` when the task has them (the synthetic task: its first operand, the named
    constant), which a scratch pool's experts split between them ("": the question's first character)."""

    id: str
    question: str
    messages: list[Message]
    answer: str
    answer_type: str
    choices: tuple[str, ...] | None = None
    solution: str | None = None
    group: str = ""


@dataclasses.dataclass
class Task:
    """A named set of splits ("dev", "test", and "train" where the source has one).

    Construction refuses splits that share a question with "test" (SplitOverlapError).
    """

    name: str
    answer_type: str
    splits: dict[str, list[Example]]

    def __post_init__(self) -> None:
        missing = {"dev", "test"} - set(self.splits)
        if missing:
            raise ValueError(f"task {self.name}: missing split(s) {sorted(missing)}")
        check_disjoint(self.name, {k: [e.question for e in v] for k, v in self.splits.items()})

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise KeyError(f"task {self.name} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    @property
    def dev(self) -> list[Example]:
        return self.splits["dev"]

    @property
    def test(self) -> list[Example]:
        return self.splits["test"]

    def dataset(self, split: str) -> grain.MapDataset:
        """The split as a grain MapDataset of Examples (shuffle/map/batch it as usual)."""
        return grain.MapDataset.source(self.split(split))
