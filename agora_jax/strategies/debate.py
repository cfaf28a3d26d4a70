"""Multi-agent debate (Du et al. 2023): N agents answer, then for R-1 rounds each agent sees the
other agents' previous answers and updates its own; the final answer is the majority vote over the
last round's extracted answers (ties: `majority_vote`, the earliest agent's answer wins).

Distillation: (question, the last-round answer of the first agent holding the majority answer), or
with `target="likeliest"` the majority answer's most probable text (the holder whose reply its writer
gave the largest sequence probability: a concise reply greedy decoding would also produce, rather
than the first sampled chain, which can ramble; label-free).
`select="confidence"` weights each last-round answer by its sequence probability under the member
that wrote it (the product of its tokens' probabilities, before temperature) and takes the answer of
largest total weight, distilling its most probable text: a confidence-weighted vote (weighted
self-consistency, e.g. Taubenfeld et al. 2025), which needs no labels and lets a member that is sure
of an item outweigh several that guess (docs/method.md, "Selecting the final answer").
`select="pool_likelihood"` takes instead the distinct last-round text that the members find most
likely together (summed log-likelihood: a product of experts over the candidates).
`discuss` is the round loop shared with multiagent_refine and multiagent_finetuning.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import ml_collections

from agora_jax.strategies import prompts
from agora_jax.strategies.answers import extract, voted_text, weighted_vote
from agora_jax.records import Result, Role, Turn
from agora_jax.strategies.base import Strategy, final_result, register
from agora_jax.pool import Message, Pool
from agora_jax.strategies.rounds import ask, sampling_defaults, sampling_params
from agora_jax.tasks import Example, Task

# (question messages, own previous answer, the others' previous answers) -> next-round messages
FollowUp = Callable[[Sequence[Message], str, Sequence[str]], list[Message]]
SELECTS = ("vote", "confidence", "pool_likelihood")  # config.strategy.select of debate
TARGETS = ("first", "likeliest")  # config.strategy.target of debate: which holder of the vote's answer is distilled


def defaults() -> ml_collections.ConfigDict:
    """rounds: answer rounds including the first (Du et al.'s code: 2); num_agents: 0 = one agent per
    member, more cycles through the members (agent j is member j % N); select: the final answer,
    "vote" (majority of the last round's answers), "confidence" (their vote weighted by each answer's
    sequence probability under its writer) or "pool_likelihood" (the distinct last-round text with the
    highest log-likelihood summed over the members); target (select="vote"): the text distilled for the
    majority answer, "first" (the first agent holding it, Du et al.'s code) or "likeliest" (the holder
    of largest sequence probability under its writer; select="confidence" always distills that one)."""
    return ml_collections.ConfigDict(dict(name="debate", rounds=2, num_agents=0, select="vote", target="first",
                                          sampling=sampling_defaults()))


def agent_members(pool: Pool, num_agents: int) -> list[int]:
    """Member index of each agent: one per member, or `num_agents` cycling through the members."""
    return [j % len(pool) for j in range(num_agents or len(pool))]


def discuss(pool: Pool, items: Sequence[Example], agents: Sequence[int], rounds: int, follow_up: FollowUp,
            sampling: ml_collections.ConfigDict, rng: jax.Array, transcript: list[Turn],
            role: Role = Role.DEBATE) -> list[list[list[str]]]:
    """Round 1: every agent answers every item; rounds 2..R: every agent answers `follow_up` of its
    own and the others' previous answers. One `pool.generate` call per round.
    Returns texts[round][item][agent]."""
    history: list[list[list[str]]] = []
    for r in range(rounds):
        requests = []
        for i, ex in enumerate(items):
            for j, member in enumerate(agents):
                if r == 0:
                    messages = list(ex.messages)
                else:
                    previous = history[-1][i]
                    messages = follow_up(ex.messages, previous[j], previous[:j] + previous[j + 1:])
                requests.append((ex.id, member, messages))
        outs = ask(pool, requests, sampling_params(sampling, rng, r), round=r + 1,
                   role=Role.ANSWER if r == 0 else role, transcript=transcript)
        flat = [c[0].text for c in outs]
        history.append([flat[i * len(agents):(i + 1) * len(agents)] for i in range(len(items))])
    return history


def voted_result(items: Sequence[Example], texts: Sequence[Sequence[str]], transcript: list[Turn]) -> Result:
    """Majority answer per item (the text of the first agent holding it) and its distillation data."""
    return final_result(items, [voted_text(t, ex) for t, ex in zip(texts, items)], transcript)


def likeliest_texts(items: Sequence[Example], last_round: Sequence[Turn], weighted: bool = True) -> list[str]:
    """Per item, the most probable text (sequence probability under its writer) holding the winning
    answer among `last_round` (the turns of the items' last round, item-major as `discuss` asks them):
    of the vote weighted by those probabilities (`weighted`, select="confidence"), else of the majority."""
    agents = len(last_round) // len(items)
    texts = []
    for i, ex in enumerate(items):
        turns = last_round[i * agents:(i + 1) * agents]
        if any(t.item_id != ex.id or t.logprobs is None for t in turns):
            raise ValueError(f"the likeliest text needs the log-probabilities of item {ex.id}'s last-round answers")
        logprobs = [sum(t.logprobs) for t in turns]
        votes = logprobs if weighted else [0.0] * len(turns)
        index, _ = weighted_vote([extract(t.output, ex) for t in turns], votes, holder_scores=logprobs)
        texts.append(turns[index or 0].output)
    return texts


@register
class Debate(Strategy):
    name = "debate"
    defaults = staticmethod(defaults)

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        if self.config.select not in SELECTS:
            raise ValueError(f"debate select={self.config.select!r}; expected one of {', '.join(SELECTS)}")
        if self.config.target not in TARGETS:
            raise ValueError(f"debate target={self.config.target!r}; expected one of {', '.join(TARGETS)}")
        items = task.split(split)
        transcript: list[Turn] = []
        history = discuss(pool, items, agent_members(pool, self.config.num_agents), self.config.rounds,
                          prompts.debate, self.config.sampling, rng, transcript)
        if self.config.select == "pool_likelihood":
            return final_result(items, pool_ranked_texts(pool, items, history[-1]), transcript)
        if self.config.select == "confidence" or self.config.target == "likeliest":
            last_round = transcript[-len(items) * len(history[-1][0]):] if items else []
            texts = likeliest_texts(items, last_round, weighted=self.config.select == "confidence")
            return final_result(items, texts, transcript)
        return voted_result(items, history[-1], transcript)


def pool_ranked_texts(pool: Pool, items: Sequence[Example], texts: Sequence[Sequence[str]]) -> list[str]:
    """Per item, the distinct last-round text with the highest log-likelihood summed over the pool's
    members (a product of experts over the candidates)."""
    candidates = [sorted(set(t)) for t in texts]
    requests = [(m, list(ex.messages), c) for ex, cs in zip(items, candidates) for c in cs for m in range(len(pool))]
    scores = iter(pool.score_batch(requests))
    answers = []
    for cs in candidates:
        totals = [sum(next(scores) for _ in range(len(pool))) for _ in cs]
        answers.append(cs[max(range(len(cs)), key=totals.__getitem__)])
    return answers
