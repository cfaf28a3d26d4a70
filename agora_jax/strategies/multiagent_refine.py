"""Multi-agent refinement (docs/method.md §1): round 1 every model answers; in rounds 2..R each model
sees its previous answer and the others' and refines it; the model best on dev then writes one
final answer from all last-round answers.

"Best on dev" = highest dev accuracy of the round-1 answers (ties: lowest member index). It is
measured when the strategy runs on dev and cached in `cache_dir(generation)/best_model.json` under the
`fingerprint` of the settings, dev items and members' weights; a test run without a cache for the
current weights (the members were distilled since) runs round 1 on dev first (dev only: never chosen
on test).
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
import ml_collections
import numpy as np

from agora_jax.strategies import prompts
from agora_jax.records import Result, Role, Turn
from agora_jax.strategies.base import Strategy, final_result, fingerprint, register, write_json
from agora_jax.strategies.debate import discuss
from agora_jax.pool import Pool
from agora_jax.strategies.rounds import ask, sampling_defaults, sampling_params
from agora_jax.tasks import Example, Task, evaluate


def defaults() -> ml_collections.ConfigDict:
    """rounds: answer rounds (1 = answer only, 2 = answer + one refinement); final_member: -1 picks
    the member best on dev, k >= 0 fixes member k as the final writer."""
    return ml_collections.ConfigDict(dict(name="multiagent_refine", rounds=2, final_member=-1,
                                          sampling=sampling_defaults()))


def dev_accuracies(first_round: Sequence[Sequence[str]], items: Sequence[Example]) -> list[float]:
    """Accuracy of each member's round-1 answers (`first_round[item][member]`)."""
    return [evaluate([texts[m] for texts in first_round], items).accuracy for m in range(len(first_round[0]))]


@register
class MultiagentRefine(Strategy):
    name = "multiagent_refine"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        c = self.config
        items = task.split(split)
        members = list(range(len(pool)))
        transcript: list[Turn] = []
        history = discuss(pool, items, members, c.rounds, prompts.refine, c.sampling, rng, transcript, role=Role.REFINE)
        info = {}
        if c.final_member >= 0:
            final = c.final_member
        else:
            scores = self._dev_scores(pool, task, split, history[0], jax.random.fold_in(rng, 1000))
            final = int(np.argmax(scores))
            info["dev_accuracy"] = dict(zip(pool.names, scores))
        info["final_member"] = pool.names[final]
        requests = [(ex.id, final, prompts.synthesize(ex.messages, texts)) for ex, texts in zip(items, history[-1])]
        outs = ask(pool, requests, sampling_params(c.sampling, rng, c.rounds), round=c.rounds + 1, role=Role.FINAL,
                   transcript=transcript)
        answers = [o[0].text for o in outs]
        return final_result(items, answers, transcript, info, teachers=pool.names[final])  # the writer's

    def _dev_scores(self, pool: Pool, task: Task, split: str, first_round: list[list[str]],
                    rng: jax.Array) -> list[float]:
        """Round-1 dev accuracy per member: measured now on dev, else read from the cache when it was
        measured with these weights, else measured on dev; what was measured is cached."""
        cache = self.cache_dir(pool.generation)
        path = cache / "best_model.json" if cache is not None else None
        dev = task.split("dev")
        key = fingerprint(self.config, task, dev, pool)
        if split != "dev":
            if path is not None and path.exists():
                saved = json.loads(path.read_text())
                if saved["fingerprint"] == key:
                    return saved["dev_accuracy"]
            first_round = discuss(pool, dev, list(range(len(pool))), 1, prompts.refine, self.config.sampling, rng, [])[0]
        scores = dev_accuracies(first_round, dev)
        if path is not None:
            write_json(path, {"fingerprint": key, "members": pool.names, "dev_accuracy": scores})
        return scores
