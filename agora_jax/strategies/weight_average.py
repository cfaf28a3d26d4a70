"""`weight_average` (weight level): the elementwise (weighted) mean of the members' parameters answers.

Settings (`defaults()`):
    weights   per-member merge weights (normalised); [] = equal
    sampling  decoding of the merged model's answers (`SamplingParams` fields)

Also home of the small helpers the one-answer-per-item strategies share (routers, logit fusion,
merges): config defaults, answering items in one `generate` call, the merged model as a one-member
pool, and the `Result` whose answers are also its distillation examples.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
from flax import nnx

from agora_jax.sampling import SamplingParams
from agora_jax.strategies.base import DistillExample, Result, Strategy, Turn, register
from agora_jax.strategies.merging import param_tree, weighted_mean, with_params
from agora_jax.strategies.pool import Member, Pool, ask, sampling_defaults, sampling_params
from agora_jax.tasks import Example, Task


def answer_items(pool: Pool, members: Sequence[int], items: Sequence[Example], params: SamplingParams, *,
                 round: int, transcript: list[Turn], role: str = "answer") -> list[Turn]:
    """Item k answered by member `members[k]` (one `generate` call, `params.n` must be 1); returns the
    new turns, also appended to `transcript`."""
    start = len(transcript)
    ask(pool, [(it.id, int(m), it.messages) for it, m in zip(items, members)], params, round=round, role=role,
        transcript=transcript)
    return transcript[start:]


def single_answer_result(name: str, items: Sequence[Example], finals: Sequence[Turn], transcript: list[Turn],
                         info: dict[str, Any]) -> Result:
    """Final answer k = `finals[k].output`; every final answer is also a distillation example."""
    examples = [DistillExample(item_id=it.id, messages=list(it.messages), completion=t.output, source=name)
                for it, t in zip(items, finals)]
    return Result(answers=[t.output for t in finals], transcript=transcript, examples=examples, info=info)


def fingerprint(config: ml_collections.ConfigDict, task: Task, items: Sequence[Example], pool: Pool) -> str:
    """Identifies what a cached fit depends on: settings, task, fit items, members."""
    blob = json.dumps([config.to_dict(), task.name, [e.id for e in items], pool.names], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Written to a temporary file and renamed (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


class MergedModel:
    """The merged model of a weight-level strategy, as a one-member pool kept across runs: a new merge
    is written into it in place (`nnx.update`) and its engine, compiled once, reads the current
    weights on every call (any number of merges: PSO particles, evolution rounds)."""

    def __init__(self, name: str):
        self.name = name
        self.pool: Pool | None = None

    def load(self, pool: Pool, params: Any) -> Pool:
        """The one-member pool with `pool[0]`'s architecture and tokenizer and parameters `params`."""
        held = self.pool
        if held is None or held[0].model.config != pool[0].model.config or held[0].tokenizer is not pool[0].tokenizer:
            self.pool = Pool([Member(self.name, with_params(pool[0].model, params), pool[0].tokenizer)], pool.generation)
        else:
            nnx.update(held[0].model, params)
            held.generation = pool.generation
        return self.pool


def defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="weight_average", weights=[], sampling=sampling_defaults()))


@register
class WeightAverage(Strategy):
    """theta = sum_i w_i theta_i / sum_i w_i over the pool (one architecture); the merged model answers."""

    name = "weight_average"
    defaults = staticmethod(defaults)

    def __init__(self, config: ml_collections.ConfigDict, workdir=None):
        super().__init__(config, workdir)
        self.merged = MergedModel(self.name)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        weights = list(self.config.weights) or None
        merged = self.merged.load(pool, weighted_mean([param_tree(m.model) for m in pool.members], weights))
        items, transcript = task.split(split), []
        finals = answer_items(merged, [0] * len(items), items, sampling_params(self.config.sampling, rng, 1), round=1,
                              transcript=transcript)
        return single_answer_result(self.name, items, finals, transcript, {"weights": weights or "equal"})
