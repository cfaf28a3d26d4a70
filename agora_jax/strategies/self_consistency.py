"""Majority vote / self-consistency (Wang et al. 2023): every member samples k answers per item (one
engine call, `n=k`); the final answer is the majority over all extracted answers of all members
(ties: the earliest sample, members in pool order, wins), returned as the first sample holding it.
"""

from __future__ import annotations

import jax
import ml_collections

from agora_jax.records import Result, Role, Turn
from agora_jax.strategies.base import Strategy, register
from agora_jax.strategies.debate import voted_result
from agora_jax.pool import Pool
from agora_jax.strategies.rounds import ask, sampling_defaults, sampling_params
from agora_jax.tasks import Task


def defaults() -> ml_collections.ConfigDict:
    """samples: k answers per member and item."""
    return ml_collections.ConfigDict(dict(name="self_consistency", samples=5, sampling=sampling_defaults()))


@register
class SelfConsistency(Strategy):
    name = "self_consistency"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        items = task.split(split)
        transcript: list[Turn] = []
        n = len(pool)
        outs = ask(pool, [(ex.id, m, list(ex.messages)) for ex in items for m in range(n)],
                   sampling_params(self.config.sampling, rng, 0, n=self.config.samples), round=1, role=Role.ANSWER,
                   transcript=transcript)
        samples = [[c.text for o in outs[i * n:(i + 1) * n] for c in o] for i in range(len(items))]
        return voted_result(items, samples, transcript)
