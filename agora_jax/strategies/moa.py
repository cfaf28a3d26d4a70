"""Mixture-of-Agents (Wang et al. 2024): layers of proposers; in layer 1 every proposer answers the
question, in each later layer every proposer answers again with all of the previous layer's answers
as references; an aggregator member synthesizes the last layer's answers into the final answer.
"""

from __future__ import annotations

import jax
import ml_collections

from agora_jax.strategies import prompts
from agora_jax.records import Result, Role, Turn
from agora_jax.strategies.base import Strategy, final_result, register
from agora_jax.pool import Pool
from agora_jax.strategies.rounds import ask, sampling_defaults, sampling_params
from agora_jax.tasks import Task


def defaults() -> ml_collections.ConfigDict:
    """layers: proposer layers before the aggregator (the paper's 3-layer MoA = 2 + aggregator);
    proposers: member indices (empty = all); aggregator: member index."""
    return ml_collections.ConfigDict(dict(name="moa", layers=2, proposers=(), aggregator=0,
                                          sampling=sampling_defaults()))


@register
class MixtureOfAgents(Strategy):
    name = "moa"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        c = self.config
        items = task.split(split)
        proposers = list(c.proposers) or list(range(len(pool)))
        transcript: list[Turn] = []
        previous: list[list[str]] | None = None
        for layer in range(c.layers + 1):
            last = layer == c.layers
            requests = [(ex.id, m, list(ex.messages) if previous is None else prompts.synthesize(ex.messages, prev))
                        for ex, prev in zip(items, previous or [None] * len(items))
                        for m in ([c.aggregator] if last else proposers)]
            outs = ask(pool, requests, sampling_params(c.sampling, rng, layer), round=layer + 1,
                       role=Role.AGGREGATE if last else Role.PROPOSE, transcript=transcript)
            width = 1 if last else len(proposers)
            previous = [[o[0].text for o in outs[i * width:(i + 1) * width]] for i in range(len(items))]
        answers = [p[0] for p in previous]
        return final_result(items, answers, transcript, {"proposers": [pool.names[m] for m in proposers]})
