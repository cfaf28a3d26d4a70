"""Multiagent finetuning (Subramaniam et al. 2025): a multi-agent debate (default 2 rounds) among all
members, the consensus = majority over the final round. It proposes two training sets:

- generation agents: first-round answers that agree with the consensus (prompt: the question);
- critic agents: final-round answers that agree with the consensus (prompt: the debate prompt that
  produced them), a mix of "corrected" (the agent's first answer disagreed) and "kept" (it agreed),
  told apart by `DistillExample.source`.

Which members are generation and which critic agents is configurable (default: the first half,
rounded up, generate; the rest criticise; a single member is both).
"""

from __future__ import annotations

import jax
import ml_collections

from agora_jax.strategies import prompts
from agora_jax.strategies.base import DistillExample, Result, Strategy, Turn, register
from agora_jax.strategies.debate import discuss
from agora_jax.strategies.pool import Pool, extract, sampling_defaults, vote
from agora_jax.tasks import Task


def defaults() -> ml_collections.ConfigDict:
    """rounds: debate rounds including the first; generation_agents / critic_agents: member indices
    (empty: first half rounded up / the rest)."""
    return ml_collections.ConfigDict(dict(name="multiagent_finetuning", rounds=2, generation_agents=(),
                                          critic_agents=(), sampling=sampling_defaults()))


def roles(n: int, generation: tuple[int, ...], critic: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(generation agents, critic agents) as member indices, defaults filled in."""
    half = (n + 1) // 2
    return list(generation) or list(range(half)), list(critic) or (list(range(half, n)) or list(range(n)))


@register
class MultiagentFinetuning(Strategy):
    name = "multiagent_finetuning"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        c = self.config
        if c.rounds < 2:
            raise ValueError(f"multiagent_finetuning needs a debate of >= 2 rounds, got rounds={c.rounds}")
        items = task.split(split)
        agents = list(range(len(pool)))
        generation, critic = roles(len(pool), tuple(c.generation_agents), tuple(c.critic_agents))
        gen_names = tuple(pool.names[m] for m in generation)
        critic_names = tuple(pool.names[m] for m in critic)
        transcript: list[Turn] = []
        history = discuss(pool, items, agents, c.rounds, prompts.debate, c.sampling, rng, transcript)

        answers, examples = [], []
        counts = {"generation": 0, "critic_corrected": 0, "critic_kept": 0}
        for i, ex in enumerate(items):
            first, before, final = history[0][i], history[-2][i], history[-1][i]
            index, consensus = vote(final, ex)
            answers.append(final[index or 0])
            if consensus is None:
                continue
            for j in agents:
                if extract(first[j], ex) == consensus:
                    examples.append(DistillExample(ex.id, list(ex.messages), first[j], gen_names,
                                                   source="multiagent_finetuning/generation"))
                    counts["generation"] += 1
                if extract(final[j], ex) == consensus:
                    kind = "critic_kept" if extract(first[j], ex) == consensus else "critic_corrected"
                    messages = prompts.debate(ex.messages, before[j], before[:j] + before[j + 1:])
                    examples.append(DistillExample(ex.id, messages, final[j], critic_names,
                                                   source=f"multiagent_finetuning/{kind}"))
                    counts[kind] += 1
        info = {"generation_agents": list(gen_names), "critic_agents": list(critic_names), "examples": counts}
        return Result(answers, transcript, examples, info)
