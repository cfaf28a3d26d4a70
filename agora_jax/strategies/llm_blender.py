"""LLM-Blender (Jiang et al. 2023) with an LLM judge as PairRanker: every member answers; a ranker
member judges every pair of answers (A or B, both orders by default to cancel position bias); each
judgment adds the probability it gives to an answer to that answer's wins; the top-k answers (most
wins first, ties: lower member index) go to a fuser member (GenFuser) that writes the final answer.

Judging: mode "likelihood" compares the ranker's likelihood of replying "A" vs "B" (one forward,
soft verdicts); mode "generate" samples a reply and reads its letter (no letter: half a win each).
"""

from __future__ import annotations

import itertools

import jax
import ml_collections
import numpy as np

from agora_jax.strategies import prompts
from agora_jax.records import Result, Role, Turn
from agora_jax.strategies.base import Strategy, final_result, register
from agora_jax.pool import Pool
from agora_jax.strategies.judging import choose
from agora_jax.strategies.rounds import ask, sampling_defaults, sampling_params
from agora_jax.tasks import Task


def defaults() -> ml_collections.ConfigDict:
    """ranker / fuser: member indices; top_k: answers passed to the fuser (fuse=False returns the
    top-ranked answer unchanged); judge: "likelihood" or "generate"; both_orders: judge (a, b) and
    (b, a); judge_sampling: decoding of generated verdicts."""
    return ml_collections.ConfigDict(dict(
        name="llm_blender", ranker=0, fuser=0, top_k=3, fuse=True, judge="likelihood", both_orders=True,
        sampling=sampling_defaults(), judge_sampling=dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                                                          max_new_tokens=8)))


def rank(wins: np.ndarray) -> list[int]:
    """Candidates by wins, most first; ties go to the lower index."""
    return sorted(range(len(wins)), key=lambda c: (-wins[c], c))


@register
class LLMBlender(Strategy):
    name = "llm_blender"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        c = self.config
        items = task.split(split)
        transcript: list[Turn] = []
        n = len(pool)
        outs = ask(pool, [(ex.id, m, list(ex.messages)) for ex in items for m in range(n)],
                   sampling_params(c.sampling, rng, 0), round=1, role=Role.ANSWER, transcript=transcript)
        candidates = [[o[0].text for o in outs[i * n:(i + 1) * n]] for i in range(len(items))]

        pairs = list(itertools.permutations(range(n), 2) if c.both_orders else itertools.combinations(range(n), 2))
        judged = choose(pool, [(ex.id, c.ranker, prompts.judge_pair(ex.question, cand[a], cand[b]))
                               for ex, cand in zip(items, candidates) for a, b in pairs],
                        prompts.JUDGE_OPTIONS, mode=c.judge, params=sampling_params(c.judge_sampling, rng, 1),
                        round=2, role=Role.RANK, transcript=transcript)
        wins = np.zeros((len(items), n))
        for k, probs in enumerate(judged):
            a, b = pairs[k % len(pairs)]
            wins[k // len(pairs), [a, b]] += probs
        rankings = [rank(w) for w in wins]

        if c.fuse:
            requests = [(ex.id, c.fuser, prompts.fuse(ex.messages, [cand[r] for r in ranking[:c.top_k]]))
                        for ex, cand, ranking in zip(items, candidates, rankings)]
            fused = ask(pool, requests, sampling_params(c.sampling, rng, 2), round=3, role=Role.FUSE,
                        transcript=transcript)
            answers = [o[0].text for o in fused]
        else:
            answers = [cand[ranking[0]] for cand, ranking in zip(candidates, rankings)]
        info = {"rankings": [[pool.names[r] for r in ranking] for ranking in rankings], "wins": wins.tolist()}
        return final_result(items, answers, transcript, info)
