"""What a generation call asks for (`SamplingParams`) and what it returns (`Completion`)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one `generate` call (shared by all its prompts).

    temperature 0 is greedy decoding. `top_k` 0, `top_p` 1 and `min_p` 0 switch those filters off.
    `stop_token_ids` / `stop_strings` None take the tokenizer's (`Tokenizer.stop_ids`,
    `Tokenizer.stop_strings`); pass `()` to generate exactly `max_new_tokens`.
    `seed`: one int (prompt i then uses seed + i) or one seed per prompt; sample j of a prompt folds j
    into its seed, so a prompt's samples do not depend on the batch it shares.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] | None = None
    seed: int | tuple[int, ...] = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in ("stop_token_ids", "stop_strings", "seed"):
            value = getattr(self, name)
            if isinstance(value, list):  # accept lists, keep the dataclass hashable
                object.__setattr__(self, name, tuple(value))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seeds(self, num_prompts: int) -> list[int]:
        """One seed per prompt."""
        if isinstance(self.seed, int):
            return [self.seed + i for i in range(num_prompts)]
        if len(self.seed) != num_prompts:
            raise ValueError(f"{len(self.seed)} seeds for {num_prompts} prompts")
        return list(self.seed)

    def member_seeds(self, prompts_per_member: Sequence[int]) -> list[list[int]]:
        """One seed per prompt of a multi-member call, numbered member-major (member 0's prompts, then
        member 1's, ...): no two prompts of the call share a seed, so members with identical weights
        still sample differently."""
        seeds = self.seeds(sum(prompts_per_member))
        offsets = np.cumsum([0, *prompts_per_member])
        return [seeds[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


@dataclasses.dataclass
class Completion:
    """One generated sample: its tokens (a stop token that ended it included), the text (stop token or
    stop string excluded), the log-probability of each token under the model's (or the fused)
    next-token distribution before temperature and filtering, and why it ended."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


Prompt = str | Sequence[int] | Sequence[dict[str, str]]
"""A prompt: text used verbatim, token ids, or chat messages (formatted with the chat template)."""
