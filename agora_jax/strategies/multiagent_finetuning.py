"""Multiagent finetuning (Subramaniam et al. 2025; docs/method.md §1): a multi-agent debate (default 2
rounds) among all members, the consensus of an item = the majority over the final round (ties: the
earliest agent), and every member trained on its own answers, by role.

Agents and members: agent j is pool member j, and every member answers in every debate round (round
1: the question; rounds 2..R: the debate prompt with its own and the others' previous answers). Where
the paper gives each agent a generation model for round 1 and a critic model for later rounds, a pool
member here plays one role or both in training (**ours**: the debate itself is Du et al.'s, so a
collaboration round costs the same as `debate`):

- a generation agent trains on its own round-1 answers that state the consensus (prompt: the question);
- a critic agent trains on its own final-round answers that state the consensus (prompt: the debate
  prompt it answered), "corrected" ones (its own round-1 answer did not state the consensus) and
  "kept" ones (it did), mixed so that a share `corrected_fraction` of its set is corrected: the
  paper's D^C = w D^C- + (1 - w) D^C+ with w = `corrected_fraction` (default 0.5, equal shares:
  **ours**, the paper tunes w), as counts. The kind in short supply is kept whole and the other
  subsampled (seeded by the run's rng); a critic with answers of one kind only keeps them all when
  0 < w < 1 (no mix can be made); w = 1 keeps only corrected, w = 0 only kept ones.

Every example targets its member alone (`targets=(name,)`). Roles are member indices (default: the
first half, rounded up, generate; the rest criticise; a single member is both); a member in both
lists gets both sets.
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np

from agora_jax.errors import ConfigError
from agora_jax.strategies import prompts
from agora_jax.records import DistillExample, Result, Turn
from agora_jax.strategies.base import Strategy, register
from agora_jax.strategies.debate import discuss
from agora_jax.pool import Pool
from agora_jax.strategies.answers import extract, vote
from agora_jax.strategies.rounds import sampling_defaults, seed_ints
from agora_jax.tasks import Example, Task

SOURCE = "multiagent_finetuning"
KINDS = ("generation", "critic_corrected", "critic_kept")


def defaults() -> ml_collections.ConfigDict:
    """rounds: debate rounds including the first (>= 2); generation_agents / critic_agents: member
    indices (empty: first half rounded up / the rest); corrected_fraction: share w in [0, 1] of
    corrected answers in a critic's set (the paper's mixing weight)."""
    return ml_collections.ConfigDict(dict(name="multiagent_finetuning", rounds=2, generation_agents=(),
                                          critic_agents=(), corrected_fraction=0.5, sampling=sampling_defaults()))


def roles(n: int, generation: Sequence[int], critic: Sequence[int]) -> tuple[list[int], list[int]]:
    """(generation agents, critic agents) as member indices of a pool of `n`, defaults filled in."""
    for key, members in (("generation_agents", generation), ("critic_agents", critic)):
        if any(not 0 <= m < n for m in members) or len(set(members)) != len(members):
            raise ConfigError(f"config.strategy.{key}={tuple(members)}: expected distinct member indices in "
                             f"0..{n - 1}")
    half = (n + 1) // 2
    return list(generation) or list(range(half)), list(critic) or (list(range(half, n)) or list(range(n)))


def mix(corrected: list[DistillExample], kept: list[DistillExample], fraction: float,
        rng: np.random.Generator) -> list[DistillExample]:
    """The largest mix of the two kinds with `fraction` corrected (module docstring), in input order."""
    if fraction >= 1.0 or fraction <= 0.0 or not corrected or not kept:
        return (corrected if fraction > 0.0 else []) + (kept if fraction < 1.0 else [])
    if len(corrected) * (1 - fraction) > len(kept) * fraction:  # corrected ones in excess
        n_corrected, n_kept = min(len(corrected), round(len(kept) * fraction / (1 - fraction))), len(kept)
    else:
        n_corrected, n_kept = len(corrected), min(len(kept), round(len(corrected) * (1 - fraction) / fraction))
    pick = lambda xs, k: [xs[i] for i in sorted(rng.choice(len(xs), k, replace=False))]  # noqa: E731
    return pick(corrected, n_corrected) + pick(kept, n_kept)


def member_examples(items: Sequence[Example], history: list[list[list[str]]], consensus: Sequence[str | None],
                    member: int, name: str, is_generator: bool, is_critic: bool) -> dict[str, list[DistillExample]]:
    """Member `member`'s own answers that state the item's consensus, by kind (`KINDS`), from the
    debate `history` (texts[round][item][agent])."""
    out: dict[str, list[DistillExample]] = {kind: [] for kind in KINDS}
    for i, (ex, agreed) in enumerate(zip(items, consensus)):
        first, before, final = history[0][i][member], history[-2][i], history[-1][i][member]
        if agreed is None:
            continue
        first_agrees = extract(first, ex) == agreed
        if is_generator and first_agrees:
            out["generation"].append(DistillExample(ex.id, list(ex.messages), first, (name,),
                                                    source=f"{SOURCE}/generation"))
        if is_critic and extract(final, ex) == agreed:
            kind = "critic_kept" if first_agrees else "critic_corrected"
            messages = prompts.debate(ex.messages, before[member], before[:member] + before[member + 1:])
            out[kind].append(DistillExample(ex.id, messages, final, (name,), source=f"{SOURCE}/{kind}"))
    return out


@register
class MultiagentFinetuning(Strategy):
    name = "multiagent_finetuning"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        c = self.config
        if c.rounds < 2:
            raise ConfigError(f"config.strategy.rounds={c.rounds}: multiagent_finetuning needs a debate of >= 2 rounds")
        if not 0.0 <= c.corrected_fraction <= 1.0:
            raise ConfigError(f"config.strategy.corrected_fraction={c.corrected_fraction}: expected a share in [0, 1]")
        items = task.split(split)
        generation, critic = roles(len(pool), tuple(c.generation_agents), tuple(c.critic_agents))
        transcript: list[Turn] = []
        history = discuss(pool, items, range(len(pool)), c.rounds, prompts.debate, c.sampling, rng, transcript)
        votes = [vote(final, ex) for final, ex in zip(history[-1], items)]
        answers = [final[index or 0] for final, (index, _) in zip(history[-1], votes)]

        mixing = np.random.default_rng(seed_ints(jax.random.fold_in(rng, c.rounds), 1)[0])
        examples, candidates, used = [], {}, {}
        for m, name in enumerate(pool.names):
            own = member_examples(items, history, [v for _, v in votes], m, name, m in generation, m in critic)
            chosen = own["generation"] + mix(own["critic_corrected"], own["critic_kept"], c.corrected_fraction, mixing)
            candidates[name] = {kind: len(own[kind]) for kind in KINDS}
            used[name] = {kind: sum(e.source == f"{SOURCE}/{kind}" for e in chosen) for kind in KINDS}
            examples += chosen
        info = {"generation_agents": [pool.names[m] for m in generation],
                "critic_agents": [pool.names[m] for m in critic], "candidates": candidates, "examples": used}
        return Result(answers, transcript, examples, info)
