"""AGORA group distillation (docs/method.md §2), one evolution step:

1. sample: every agent samples k solutions per problem (one engine call);
2. verify: peers judge each solution (one call). verify="judge": a Yes/No judge prompt, read from a
   generated reply (judge="generate") or the likelihood of "Yes" vs "No" (judge="likelihood");
   verify="likelihood": the probability the verifier gives the solution's answer among the item's
   candidate answers (its likelihood of `answer_template`, normalised over the candidates);
3. validate: a solution with an extracted answer is validated when the mean verdict of its peers
   (verifiers other than its author) >= min_peer_score and the fraction of the other agents'
   solutions sharing its answer >= min_agreement;
4. remember: validated dev solutions enter a shared memory (`workdir/strategy/agora/memory.jsonl`),
   deduplicated by (item, normalised text or answer), persisting across generations; each entry
   records the generation that found it, and generation g starts from the entries of generations
   < g, so a re-run of g after a kill has exactly the memory an uninterrupted run has (docs/method.md
   §2); the file is rewritten whole through a temporary file, never left half-written;
5. distill: every memory solution of this split becomes training data for the author's peers
   (weight 1) and for its author (weight `self_weight`);
6. elite-peer learning: when the group's dev accuracy has not improved for `patience` generations,
   the training data is drawn only from the `elite_k` agents with the highest peer-validated rate
   (fraction of their solutions validated this generation; `elite_mode="draw"`), or weighted toward
   them: all of it is kept and the elite agents' solutions weigh `elite_weight` times as much
   (`elite_mode="weight"`).

The final answer of an item is the majority over its validated solutions (all solutions if none
is validated). Scores, rates and elite choices per generation live in `.../agora/state.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from agora_jax.atomic import atomic_write_text
from agora_jax.errors import ConfigError
from agora_jax.strategies import prompts
from agora_jax.records import DistillExample, Result, Role, Turn
from agora_jax.strategies.base import Strategy, register, write_json
from agora_jax.pool import Pool
from agora_jax.strategies.answers import extract, voted_text
from agora_jax.strategies.judging import choose
from agora_jax.strategies.rounds import ask, sampling_defaults, sampling_params
from agora_jax.tasks import Example, Task, evaluate, extract_answer

ELITE_MODES = ("draw", "weight")  # elite-peer learning: data only from the elite agents, or weighted toward them
VERIFIERS = ("judge", "likelihood")  # config.strategy.verify
DEDUPS = ("text", "answer")  # config.strategy.dedup


def defaults() -> ml_collections.ConfigDict:
    """samples: k solutions per agent and problem; verify: "judge" or "likelihood"; judge: how a
    judge verdict is read, "generate" or "likelihood"; answer_template: the reply scored in verify=
    "likelihood"; min_peer_score / min_agreement: validation thresholds; dedup: "text" or "answer";
    self_weight: weight of an agent's own solutions in its training data; patience / elite_k:
    elite-peer learning after `patience` generations without a better group dev accuracy, from the
    `elite_k` agents with the highest peer-validated rate; elite_mode: one of `ELITE_MODES`, "draw"
    (train only on the elite agents' solutions) or "weight" (keep every solution, the elite agents'
    weighted `elite_weight` > 0 times as much); judge_sampling: decoding of generated verdicts."""
    return ml_collections.ConfigDict(dict(
        name="agora", samples=4, verify="judge", judge="generate", answer_template="{answer}",
        min_peer_score=0.5, min_agreement=0.25, dedup="text", self_weight=0.5, patience=2, elite_k=2,
        elite_mode="draw", elite_weight=2.0, sampling=sampling_defaults(),
        judge_sampling=dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, max_new_tokens=8)))


@dataclasses.dataclass
class Solution:
    """One sampled solution and what verification made of it."""

    item: int
    author: int
    text: str
    answer: str | None  # normalised extracted answer (`pool.extract`)
    peer_score: float = 0.0
    agreement: float = 0.0
    validated: bool = False


# ---------------------------------------------------------------------- memory and state


class Memory:
    """Validated solutions shared by the group across generations: a JSONL file, one entry a line,
    deduplicated by (item id, normalised text) or (item id, answer). No path: in memory only.

    Each entry carries the `generation` that found it; only the entries of generations < `before`
    are loaded, so a generation that is run again (a resume after a kill) starts from the memory of
    the generations before it, not from what its killed run had already added."""

    def __init__(self, path: pathlib.Path | None, dedup: str, before: int):
        if dedup not in DEDUPS:
            raise ConfigError(f"config.strategy.dedup={dedup!r}; expected one of {', '.join(DEDUPS)}")
        self.path, self.dedup = path, dedup
        self.entries: list[dict[str, Any]] = []
        if path is not None and path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.entries = [e for e in lines if e["generation"] < before]
        self._keys = {self.key(e) for e in self.entries}

    def key(self, entry: dict[str, Any]) -> tuple[str, str]:
        value = entry["answer"] if self.dedup == "answer" else " ".join(entry["completion"].split()).lower()
        return entry["item_id"], value

    def add(self, entries: Sequence[dict[str, Any]]) -> int:
        """Adds the entries not already remembered and rewrites the file; returns how many were new."""
        new = []
        for e in entries:
            if self.key(e) not in self._keys:
                self._keys.add(self.key(e))
                new.append(e)
        self.entries += new
        if self.path is not None:  # whole, through a temporary file: a kill leaves the old or the new memory
            atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in self.entries))
        return len(new)


def stalled(scores: Sequence[float], patience: int) -> bool:
    """True when the last `patience` scores did not beat the best score before them."""
    return len(scores) > patience and max(scores[-patience:]) <= max(scores[:-patience])


def elite_agents(rates: Sequence[float], k: int) -> list[int]:
    """The k agents with the highest peer-validated rate (ties: lower index), in index order."""
    return sorted(sorted(range(len(rates)), key=lambda a: (-rates[a], a))[:k])


def _read_json(path: pathlib.Path | None, default: dict) -> dict:
    return json.loads(path.read_text()) if path is not None and path.exists() else default


# ---------------------------------------------------------------------- the strategy


@register
class Agora(Strategy):
    name = "agora"
    defaults = staticmethod(defaults)

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
        super().__init__(config, workdir)
        if self.config.elite_mode not in ELITE_MODES:
            raise ConfigError(f"config.strategy.elite_mode={self.config.elite_mode!r}; expected one of "
                              f"{', '.join(ELITE_MODES)}")
        if not self.config.elite_weight > 0:
            raise ConfigError(f"config.strategy.elite_weight={self.config.elite_weight!r}; expected a number > 0")

    def run(self, pool: Pool, task: Task, split: str, rng: jax.Array) -> Result:
        c = self.config
        items = task.split(split)
        transcript: list[Turn] = []
        solutions = self.sample(pool, items, rng, transcript)
        self.verify(pool, items, solutions, rng, transcript)
        validate(solutions, c.min_peer_score, c.min_agreement)

        answers = [self.final_answer(ex, [s for s in solutions if s.item == i]) for i, ex in enumerate(items)]
        rates = [sum(s.validated for s in solutions if s.author == a) / (len(items) * c.samples)
                 for a in range(len(pool))]
        info: dict[str, Any] = {"validated_rate": dict(zip(pool.names, rates)), "solutions": len(solutions),
                                "validated": sum(s.validated for s in solutions)}
        # dev adds this generation's solutions to the memory of the generations before it; test reads it
        memory = Memory(self._state_file(pool, "memory.jsonl"), c.dedup,
                        before=pool.generation + (split != "dev"))
        elite = None
        if split == "dev":  # only dev solutions are remembered and only dev accuracy is tracked
            info["new_in_memory"] = memory.add([self.entry(pool, items, s) for s in solutions if s.validated])
            elite = self.track(pool, evaluate(answers, items).accuracy, rates, info)
        info["memory_size"] = len(memory.entries)
        examples = self.examples(pool, memory, {ex.id for ex in items}, elite)
        return Result(answers, transcript, examples, info)

    def _state_file(self, pool: Pool, name: str) -> pathlib.Path | None:
        """`workdir/strategy/agora/<name>`: shared by all generations (None without a workdir)."""
        return self.cache_dir(pool.generation).parent / name if self.workdir is not None else None

    def track(self, pool: Pool, dev_accuracy: float, rates: Sequence[float], info: dict[str, Any]) -> list[str] | None:
        """Records this generation's group dev accuracy and validated rates in state.json; returns the
        elite agents' names when the accuracy has stalled for `patience` generations, else None."""
        path = self._state_file(pool, "state.json")
        state = _read_json(path, {"dev_accuracy": {}, "validated_rate": {}, "elite": {}})
        generation = str(pool.generation)
        state["dev_accuracy"][generation] = dev_accuracy
        state["validated_rate"][generation] = dict(zip(pool.names, rates))
        history = [acc for g, acc in sorted(state["dev_accuracy"].items(), key=lambda kv: int(kv[0]))
                   if int(g) <= pool.generation]
        elite = ([pool.names[a] for a in elite_agents(rates, self.config.elite_k)]
                 if stalled(history, self.config.patience) else None)
        state["elite"][generation] = elite
        if path is not None:
            write_json(path, state)
        info.update(dev_accuracy=dev_accuracy, dev_history=history, elite=elite)
        return elite

    def sample(self, pool: Pool, items: Sequence[Example], rng: jax.Array, transcript: list[Turn]) -> list[Solution]:
        """Step 1: k solutions per (agent, item), one engine call."""
        pairs = [(i, a) for i in range(len(items)) for a in range(len(pool))]
        outs = ask(pool, [(items[i].id, a, list(items[i].messages)) for i, a in pairs],
                   sampling_params(self.config.sampling, rng, 0, n=self.config.samples), round=1, role=Role.ANSWER,
                   transcript=transcript)
        return [Solution(i, a, c.text, extract(c.text, items[i])) for (i, a), cs in zip(pairs, outs) for c in cs]

    def verify(self, pool: Pool, items: Sequence[Example], solutions: list[Solution], rng: jax.Array,
               transcript: list[Turn]) -> None:
        """Step 2: sets each solution's `peer_score`, the mean verdict of the verifiers that are not its author."""
        c = self.config
        # what each verifier judges: a distinct (item, text) for "judge", a distinct (item, answer) for "likelihood"
        subject = (lambda s: (s.item, s.text)) if c.verify == "judge" else (lambda s: (s.item, s.answer))
        authors: dict[tuple, set[int]] = {}
        for s in solutions:
            if s.answer is not None or c.verify == "judge":
                authors.setdefault(subject(s), set()).add(s.author)
        jobs = [(key, v) for key, by in authors.items() for v in range(len(pool)) if by - {v}]
        if c.verify == "judge":
            probs = choose(pool, [(items[i].id, v, prompts.verify(items[i].question, text)) for (i, text), v in jobs],
                           prompts.VERDICTS, mode=c.judge, params=sampling_params(c.judge_sampling, rng, 1),
                           round=2, role=Role.VERIFY, transcript=transcript)
            verdict = {job: float(p[0]) for job, p in zip(jobs, probs)}
        elif c.verify == "likelihood":
            verdict = self._answer_probabilities(pool, items, solutions, jobs, transcript)
        else:
            raise ConfigError(f"config.strategy.verify={c.verify!r}; expected one of {', '.join(VERIFIERS)}")
        for s in solutions:
            peers = [verdict[(subject(s), v)] for v in range(len(pool)) if v != s.author and (subject(s), v) in verdict]
            s.peer_score = float(np.mean(peers)) if peers else 0.0

    def _answer_probabilities(self, pool: Pool, items: Sequence[Example], solutions: Sequence[Solution],
                              jobs: list[tuple[tuple, int]], transcript: list[Turn]) -> dict[tuple, float]:
        """verify="likelihood": each verifier's likelihood of every candidate answer of an item (one
        batched forward), normalised over the item's candidates."""
        shown = {}  # (item, answer key) -> the answer as the first solution holding it states it
        for s in solutions:
            if s.answer is not None and (s.item, s.answer) not in shown:
                ex = items[s.item]
                shown[(s.item, s.answer)] = extract_answer(s.text, ex.answer_type, ex.choices)
        scores = pool.score_batch([(v, items[i].messages, self.config.answer_template.format(answer=shown[(i, a)]))
                                   for (i, a), v in jobs])
        by_item: dict[tuple[int, int], list[int]] = {}
        for k, ((i, _), v) in enumerate(jobs):
            by_item.setdefault((i, v), []).append(k)
        probs = {}
        for (i, v), ks in by_item.items():
            ll = np.asarray([scores[k] for k in ks])
            for k, p in zip(ks, np.exp(ll - np.logaddexp.reduce(ll))):
                probs[jobs[k]] = float(p)
            transcript.append(Turn(item_id=items[i].id, model=pool.names[v], round=2, role=Role.VERIFY,
                                   prompt=list(items[i].messages), output=" | ".join(shown[jobs[k][0]] for k in ks),
                                   logprobs=ll.tolist()))
        return probs

    def final_answer(self, example: Example, solutions: Sequence[Solution]) -> str:
        """Majority over the item's validated solutions, else over all of them."""
        chosen = [s.text for s in solutions if s.validated] or [s.text for s in solutions]
        return voted_text(chosen, example)

    def entry(self, pool: Pool, items: Sequence[Example], s: Solution) -> dict[str, Any]:
        """A memory line for a validated solution."""
        return {"item_id": items[s.item].id, "messages": list(items[s.item].messages), "completion": s.text,
                "answer": s.answer, "author": pool.names[s.author], "generation": pool.generation,
                "peer_score": s.peer_score, "agreement": s.agreement}

    def examples(self, pool: Pool, memory: Memory, item_ids: set[str],
                 elite: Sequence[str] | None) -> list[DistillExample]:
        """Step 5/6: memory solutions of these items for the authors' peers (and, lighter, the authors);
        under elite-peer learning only the elite agents' solutions ("draw"), or all of them with the
        elite agents' weighted `elite_weight` times as much ("weight")."""
        out = []
        for e in memory.entries:
            weight = self.elite_factor(e["author"], elite)
            if e["item_id"] not in item_ids or weight == 0:
                continue
            if e["author"] not in pool.names:
                out.append(DistillExample(e["item_id"], e["messages"], e["completion"], weight=weight,
                                          source="agora/memory"))
                continue
            peers = tuple(n for n in pool.names if n != e["author"])
            if peers:
                out.append(DistillExample(e["item_id"], e["messages"], e["completion"], peers, weight=weight,
                                          source="agora/peer"))
            if self.config.self_weight > 0:
                out.append(DistillExample(e["item_id"], e["messages"], e["completion"], (e["author"],),
                                          weight=self.config.self_weight * weight, source="agora/self"))
        return out

    def elite_factor(self, author: str, elite: Sequence[str] | None) -> float:
        """How much a solution by `author` weighs under elite-peer learning (1 outside it; 0 drops it)."""
        if elite is None:
            return 1.0
        if self.config.elite_mode == "draw":
            return float(author in elite)
        return self.config.elite_weight if author in elite else 1.0


def validate(solutions: Sequence[Solution], min_peer_score: float, min_agreement: float) -> None:
    """Step 3: agreement = fraction of the other agents' solutions to the item with the same answer;
    validated = has an answer, peers' mean verdict >= min_peer_score, agreement >= min_agreement."""
    by_item: dict[int, list[Solution]] = {}
    for s in solutions:
        by_item.setdefault(s.item, []).append(s)
    for group in by_item.values():
        for s in group:
            others = [o for o in group if o.author != s.author]
            s.agreement = sum(o.answer == s.answer for o in others) / len(others) if others else 1.0
            s.validated = s.answer is not None and s.peer_score >= min_peer_score and s.agreement >= min_agreement
