"""`weight_average` (weight level): the elementwise (weighted) mean of the members' parameters answers.

Averaging is meaningful only for members of one initialisation (a scratch pool built with
`pool.shared_init`, or fine-tunes of one checkpoint); members trained from different random
initialisations average into a network that is neither.

Settings (`defaults()`):
    weights   per-member merge weights (normalised); [] = equal
    sampling  decoding of the merged model's answers (`SamplingParams` fields)
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from agora_jax.records import Result
from agora_jax.strategies.base import Strategy, register, single_answer_result
from agora_jax.strategies.merging import MergedModel, param_tree, weighted_mean
from agora_jax.pool import Pool
from agora_jax.strategies.rounds import answer_items, sampling_defaults, sampling_params
from agora_jax.tasks import Task


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

    def teacher_model(self, pool: Pool, info: dict) -> nnx.Module:
        """The averaged model `run` answers with (its weights are the config's, not `info`'s): the
        logit-KD teacher of this strategy's examples (docs/method.md §1, method 3)."""
        weights = list(self.config.weights) or None
        return self.merged.load(pool, weighted_mean([param_tree(m.model) for m in pool.members], weights))[0].model

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        weights = list(self.config.weights) or None
        merged = self.merged.load(pool, weighted_mean([param_tree(m.model) for m in pool.members], weights))
        items, transcript = task.split(split), []
        finals = answer_items(merged, [0] * len(items), items, sampling_params(self.config.sampling, rng, 1), round=1,
                              transcript=transcript)
        return single_answer_result(self.name, items, finals, transcript, {"weights": weights or "equal"})
