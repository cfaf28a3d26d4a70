"""The compute-matched control of a round's evaluation (docs/method.md): does the collaboration beat
simply sampling one member more?

Each member alone answers every test item `k` times with the strategy's sampling settings and the
majority of its `k` answers is its answer (self-consistency, `majority_vote`); `k` is what the
collaboration spent per test item: its generated messages per item, rounded up. Members with the same
weights (a pretrained pool of copies before distillation) are one model, sampled once. Messages about other
items (a router's fit on dev) and judgments read from likelihoods (no generated token) do not count.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections

from agora_jax.strategies import Role, Turn
from agora_jax.pool import Pool
from agora_jax.strategies.answers import voted_text
from agora_jax.strategies.rounds import ask, sampling_params
from agora_jax.tasks import Example, Task, evaluate


def generated(transcript: Sequence[Turn], items: Sequence[Example]) -> list[Turn]:
    """The turns of `transcript` that generated text about one of `items`."""
    ids = {ex.id for ex in items}
    return [t for t in transcript if t.item_id in ids and t.output_tokens > 0]


def collaboration_budget(transcript: Sequence[Turn], items: Sequence[Example]) -> int:
    """Samples per item that match the collaboration: its generated messages per item, rounded up
    (so the control never gets less than the collaboration), at least 1."""
    return max(1, math.ceil(len(generated(transcript, items)) / len(items)))


def compute_matched_control(pool: Pool, task: Task, transcript: Sequence[Turn], sampling: ml_collections.ConfigDict,
                            rng: jax.Array) -> tuple[dict[str, Any], list[Turn]]:
    """Every member's k-sample majority vote on test, k = `collaboration_budget(transcript)`; one
    `pool.generate` call. Returns the record stored in the evaluation unit (`samples`: k, `single`:
    accuracy per member, `best`: the best member's, and output tokens per item of the collaboration
    and, averaged over members, of the control) and the control's turns (role "control")."""
    items = task.test
    k = collaboration_budget(transcript, items)
    turns: list[Turn] = []
    # members with the same weights are one model: sampled once
    outs = pool.each_model(items, lambda rows: ask(pool, [(ex.id, m, list(ex.messages)) for m, ex in rows],
                                                   sampling_params(sampling, rng, 0, n=k), round=0,
                                                   role=Role.CONTROL, transcript=turns))
    single = {name: evaluate([voted_text([c.text for c in o], ex) for o, ex in zip(member_outs, items)],
                             task, "test").accuracy
              for name, member_outs in zip(pool.names, outs)}
    asked = len({t.model for t in turns})  # the distinct models sampled
    return {"samples": k, "single": single, "best": max(single.values()),
            "collaboration_tokens_per_item": sum(t.output_tokens for t in generated(transcript, items)) / len(items),
            "tokens_per_item": sum(t.output_tokens for t in turns) / (asked * len(items))}, turns
