"""Every registered strategy on a planted pool reaches what its algorithm guarantees there, and
multiagent_finetuning trains every member on its own answers, by role.

The planted pool: member m1 is always right; m0 and m2 answer at random (the gold answer, or one or two
more, equally likely), so ties of a vote (which go to the earliest agent) never favour the right member.
Judges are planted too: a ranker prefers the right answer of a pair, a verifier says Yes exactly to right
solutions, and a writer asked for one answer from several candidates copies the right one's slot.
Strategies that need weights (logit_fusion, the merges) run the real engine on identical tiny copies."""

from __future__ import annotations

import random
import re
from typing import Callable

import jax
import pytest

from agora_jax.evolution.config import ConfigError
from agora_jax.models import create, save_hf, tiny_tokenizer
from agora_jax.sampling import Completion, SamplingParams
from agora_jax.strategies import Result, STRATEGIES, make_strategy
from agora_jax.strategies.answers import extract
from agora_jax.strategies.multiagent_finetuning import roles
from agora_jax.pool import Member, Pool
from agora_jax.tasks import evaluate, get_task
from test_strategies_text import gold_of, is_correct, last_user, question_of
from stored_outputs import plurality_items

TOK = tiny_tokenizer()
RIGHT = 1  # the member that is always right
GREEDY = dict(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def task():
    return get_task("synthetic", digits=2, steps=2, n_dev=8, n_test=8)


@pytest.fixture(scope="module")
def models():
    return [create("tiny", seed=i) for i in range(3)]


class PlantedPool(Pool):
    """Replies and likelihoods planted as in the module docstring, or `reply(member, messages, sample)`."""

    def __init__(self, models, task, reply=None):
        super().__init__([Member(f"m{i}", m, TOK) for i, m in enumerate(models)], backend=self._generate)
        self.gold = gold_of(task)
        self.reply = reply or self.planted

    def _generate(self, pool, members, prompts, params):
        out = []
        for k, (m, messages) in enumerate(zip(members, prompts)):
            texts = [self.reply(m, messages, f"{k}/{j}") for j in range(params.n)]
            confidence = -0.1 if m == RIGHT else -1.0  # the right member is the surest of its answers
            out.append([Completion(t, TOK.encode(t), [confidence] * len(TOK.encode(t)), "stop") for t in texts])
        return out

    def planted(self, m: int, messages, sample: str) -> str:
        """`sample`: the request's place in its call and the sample's index (a random member's seed)."""
        text, gold = last_user(messages), self.gold[question_of(messages)]
        if "Which answer is more correct" in text:
            return "A" if is_correct(_section(text, "Answer A"), gold) else "B"
        if "Is this solution correct?" in text:
            return "Yes" if is_correct(_section(text, "Proposed solution"), gold) else "No"
        if m != RIGHT and "Candidate answers, best first" in text:  # a fuser keeps the top-ranked answer
            return _section(text, "Answer 1")
        if m != RIGHT and "Candidate answers from several models" in text:  # a writer copies the right slot
            return _section(text, f"Answer {RIGHT + 1}")
        if m == RIGHT:
            return gold
        return str(int(gold) + random.Random(f"{m}/{sample}/{question_of(messages)}/{len(messages)}").randrange(3))

    def score_batch(self, requests, reduce="sum", whole_turn=True):
        return [self.likelihood(m, msgs, c) for m, msgs, c in requests]

    def likelihood(self, m: int, messages, completion: str) -> float:
        text, gold = last_user(messages), self.gold[question_of(messages)]
        if "Which answer is more correct" in text:
            return 0.0 if is_correct(_section(text, f"Answer {completion}"), gold) else -3.0
        if "Is this solution correct?" in text:
            return 0.0 if (completion == "Yes") == is_correct(_section(text, "Proposed solution"), gold) else -3.0
        return (-0.1 if m == RIGHT else -1.0) if is_correct(completion, gold) else -5.0


def _section(text: str, label: str) -> str:
    """The line after `label:` (a one-line candidate or solution in a prompt)."""
    return re.search(rf"{label}:\n(.*)", text).group(1)


@pytest.fixture(scope="module")
def planted(models, task):
    return PlantedPool(models, task)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Three members with one model's weights, which are also their common base (a checkpoint), and a
    task of test_strategies_weights.py's shapes (one set of compiled engine programs for both files)."""
    model = create("tiny", seed=5)
    base = save_hf(model, tmp_path_factory.mktemp("base"), TOK)
    task = get_task("synthetic", digits=1, steps=1, n_dev=4, n_test=3, n_train=0)
    return Pool([Member(f"m{i}", model, TOK) for i in range(3)], base=str(base)), task


def run(name: str, pool: Pool, task, split: str = "test", **settings) -> Result:
    config = STRATEGIES[name].defaults()
    config.update(settings)
    return make_strategy(config).run(pool, task, split, jax.random.key(0))


def correct_items(result: Result, task, split: str = "test") -> set[str]:
    graded = evaluate(result.answers, task, split).correct
    return {ex.id for ex, ok in zip(task.split(split), graded) if ok}


def assert_vote_finds_the_plurality(result: Result, task, keep: Callable) -> None:
    """The vote over the `keep` turns gets right every item whose right answer leads them."""
    guaranteed = plurality_items(result.transcript, task.test, keep)
    assert len(guaranteed) >= 3, guaranteed  # the planted randomness leaves the guarantee something to prove
    assert guaranteed <= correct_items(result, task)


# ---------------------------------------------------------------------- one case per registered strategy

CASES: dict[str, Callable] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


@case("self_consistency")
def _self_consistency(planted, copies, task):
    result = run("self_consistency", planted, task, samples=3)
    assert_vote_finds_the_plurality(result, task, lambda t: t.role == "answer")


@case("debate")
def _debate(planted, copies, task):
    moved = 0  # items whose likeliest holder is not the first one
    for agents in (0, 5):  # one agent per member; five agents (m1 answers twice)
        result = run("debate", planted, task, num_agents=agents)
        assert_vote_finds_the_plurality(result, task, lambda t: t.round == 2)
        # weighted by sequence probability, the surest member (m1) outweighs the two that guess, even
        # when they agree: every item right, and what is distilled is m1's last-round answer
        result = run("debate", planted, task, num_agents=agents, select="confidence")
        assert correct_items(result, task) == {ex.id for ex in task.test}
        last = [t for t in result.transcript if t.round == 2 and t.model == "m1"]
        assert [e.completion for e in result.examples] == [t.output for t in last[::1 + (agents == 5)]]
        # target="likeliest": the plain majority's answers, each distilled as the text of its holder of
        # largest sequence probability (m1's whenever m1 holds it), not the first holder's
        voted = run("debate", planted, task, num_agents=agents)
        likeliest = run("debate", planted, task, num_agents=agents, target="likeliest")
        assert correct_items(likeliest, task) == correct_items(voted, task)
        for ex, first, chosen in zip(task.test, voted.examples, likeliest.examples):
            holders = [t for t in likeliest.transcript if t.round == 2 and t.item_id == ex.id
                       and extract(t.output, ex) == extract(first.completion, ex)]
            best = max(holders, key=lambda t: sum(t.logprobs))
            assert chosen.completion == best.output
            assert best.model == "m1" or all(t.model != "m1" for t in holders)
            moved += holders[0].model != "m1" and best.model == "m1"
    assert moved >= 1  # the planted votes leave the choice something to prove


@case("multiagent_finetuning")
def _multiagent_finetuning(planted, copies, task):
    result = run("multiagent_finetuning", planted, task)
    assert_vote_finds_the_plurality(result, task, lambda t: t.round == 2)


@case("llm_blender")
def _llm_blender(planted, copies, task):
    for judge in ("likelihood", "generate"):
        result = run("llm_blender", planted, task, judge=judge)
        assert correct_items(result, task) == {ex.id for ex in task.test}  # a right answer is ranked first
        rankings = zip(result.info["rankings"], result.info["wins"])
        alone = [ranking for ranking, wins in rankings if wins[RIGHT] > max(wins[0], wins[2])]  # m1 alone right
        assert alone and all(ranking[0] == f"m{RIGHT}" for ranking in alone)


@case("moa")
def _moa(planted, copies, task):
    result = run("moa", planted, task)  # aggregator m0 (random) copies proposer m1's answer
    assert correct_items(result, task) == {ex.id for ex in task.test}
    assert {t.model for t in result.transcript if t.role == "aggregate"} == {"m0"}


@case("multiagent_refine")
def _multiagent_refine(planted, copies, task):
    result = run("multiagent_refine", planted, task)
    assert result.info["final_member"] == f"m{RIGHT}" and result.info["dev_accuracy"][f"m{RIGHT}"] == 1.0
    assert correct_items(result, task) == {ex.id for ex in task.test}


@case("agora")
def _agora(planted, copies, task):
    # one sample each, every agreement accepted: only the verifiers' Yes validates the right solutions
    result = run("agora", planted, task, samples=1, min_agreement=0.0)
    rates = result.info["validated_rate"]
    assert rates["m1"] == 1.0 and rates["m0"] < 1.0 and rates["m2"] < 1.0
    assert correct_items(result, task) == {ex.id for ex in task.test}


def _routes_to_the_right_member(name: str, planted, task, **settings) -> None:
    result = run(name, planted, task, **settings)
    assert result.info["routes"] == [f"m{RIGHT}"] * len(task.test)
    assert correct_items(result, task) == {ex.id for ex in task.test}


@case("trained_router")
def _trained_router(planted, copies, task):
    _routes_to_the_right_member("trained_router", planted, task)


@case("graph_router")
def _graph_router(planted, copies, task):
    _routes_to_the_right_member("graph_router", planted, task)


def _answers_as_one_copy(name: str, copies) -> None:
    """Identical members: the collaboration's greedy answers are the one model's, token for token."""
    pool, task = copies
    result = run(name, pool, task, sampling=GREEDY)
    alone = pool.generate([(0, ex.messages) for ex in task.test], SamplingParams(**GREEDY))
    assert result.answers == [c[0].text for c in alone]
    assert [t.output_tokens for t in result.transcript] == [len(c[0].tokens) for c in alone]


@case("logit_fusion")
def _logit_fusion(planted, copies, task):
    _answers_as_one_copy("logit_fusion", copies)


@case("dare_ties")
def _dare_ties(planted, copies, task):
    _answers_as_one_copy("dare_ties", copies)


@case("weight_average")
def _weight_average(planted, copies, task):
    _answers_as_one_copy("weight_average", copies)


def test_every_registered_strategy_has_a_case():
    assert set(CASES) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_collaboration_reaches_what_its_algorithm_guarantees(name, planted, copies, task):
    CASES[name](planted, copies, task)


# ---------------------------------------------------------------------- multiagent_finetuning by role

# Planted debates of four members over six items: offsets from the gold answer (None: no answer) in
# round 1 and round 2. The consensus is the round-2 majority, right or not (item 2: gold + 7). Default
# roles: m0, m1 generate; m2, m3 criticise.
PLAN = [
    ([0, 0, 5, 5], [0, 0, 0, 5]),          # consensus 0: m2 corrected, m3 never agrees
    ([0, 3, 0, 0], [0, 0, 0, 0]),          # consensus 0: m1 fixed its answer; m2, m3 kept theirs
    ([7, 7, 0, 7], [7, 7, 7, 7]),          # consensus 7 (wrong): m2 "corrected" toward it, m3 kept
    ([None] * 4, [None] * 4),              # no answer at all: no consensus, no examples
    ([0, 0, 0, 0], [0, 0, 0, 0]),          # everyone right both times
    ([2, 0, 2, 1], [2, 0, 1, 2]),          # consensus 2 (m0, m3): m3 corrected, m2 leaves it
]
CRITICS = {"m2": {"critic_corrected": {0, 2}, "critic_kept": {1, 4}},
           "m3": {"critic_corrected": {5}, "critic_kept": {1, 2, 4}}}


@pytest.fixture(scope="module")
def debates(models):
    task = get_task("synthetic", digits=2, steps=2, n_dev=len(PLAN), n_test=1)
    row = {ex.question: (k, int(ex.answer)) for k, ex in enumerate(task.dev)}

    def reply(m, messages, sample):
        k, gold = row[question_of(messages)]
        offset = PLAN[k][last_user(messages).startswith("Other agents answered")][m]
        return "I am not sure." if offset is None else f"The answer is {gold + offset}."

    return PlantedPool(models + models[:1], task, reply), task  # four members (their weights are not read)


def by_member(result: Result, task) -> dict[str, dict[str, set[int]]]:
    """Per target member and example kind, the plan rows of its examples."""
    row = {ex.id: k for k, ex in enumerate(task.dev)}
    out: dict[str, dict[str, set[int]]] = {}
    for e in result.examples:
        (name,) = e.targets
        out.setdefault(name, {}).setdefault(e.source.split("/")[1], set()).add(row[e.item_id])
    return out


@pytest.mark.parametrize("fraction,m2,m3", [
    (0.5, (2, 2), (1, 1)),   # m2 is 1:1 already; m3 keeps its one corrected answer and one of three kept
    (0.25, (1, 2), (1, 3)),  # m2 has corrected ones in excess: one of two; m3 is 1:3 already
    (1.0, (2, 0), (1, 0)),   # corrected only
    (0.0, (0, 2), (0, 3)),   # kept only
])
def test_multiagent_finetuning_trains_each_member_on_its_own_answers_by_role(fraction, m2, m3, debates):
    pool, task = debates
    result = run("multiagent_finetuning", pool, task, "dev", corrected_fraction=fraction)
    assert result.info["generation_agents"] == ["m0", "m1"] and result.info["critic_agents"] == ["m2", "m3"]
    got = by_member(result, task)
    assert got["m0"] == {"generation": {0, 1, 2, 4, 5}}  # its own round-1 answers that state the consensus
    assert got["m1"] == {"generation": {0, 2, 4}}  # not row 1 (it said 3) nor row 5 (it said 0, consensus 2)
    for name, counts in (("m2", m2), ("m3", m3)):
        for kind, count in zip(("critic_corrected", "critic_kept"), counts):
            chosen = got[name].get(kind, set())
            assert len(chosen) == count and chosen <= CRITICS[name][kind], (name, kind, chosen)
        assert result.info["candidates"][name] == {"generation": 0, **{k: len(v) for k, v in CRITICS[name].items()}}
        assert result.info["examples"][name] == {"generation": 0, "critic_corrected": counts[0],
                                                 "critic_kept": counts[1]}
    # every example is one of its member's own turns: its prompt and its reply (round 1, or the final round)
    turns = {(t.model, t.item_id, t.round): t for t in result.transcript}
    for e in result.examples:
        turn = turns[(e.targets[0], e.item_id, 1 if e.source.endswith("generation") else 2)]
        assert (e.messages, e.completion) == (turn.prompt, turn.output)


def test_multiagent_finetuning_roles_and_settings(debates):
    assert roles(4, (), ()) == ([0, 1], [2, 3]) and roles(3, (), ()) == ([0, 1], [2]) and roles(1, (), ()) == ([0], [0])
    assert roles(3, (0, 1, 2), (2,)) == ([0, 1, 2], [2])  # a member in both lists trains on both sets
    with pytest.raises(ConfigError, match=r"config\.strategy\.critic_agents=\(3,\)"):
        roles(3, (), (3,))
    with pytest.raises(ConfigError, match=r"config\.strategy\.generation_agents=\(0, 0\)"):
        roles(3, (0, 0), ())
    pool, task = debates
    both = by_member(run("multiagent_finetuning", pool, task, "dev", generation_agents=(0, 1, 2, 3),
                         critic_agents=(2,), corrected_fraction=0.5), task)
    assert both["m2"] == {"generation": {1, 4, 5}, **CRITICS["m2"]} and both["m3"] == {"generation": {1, 2, 4}}
    with pytest.raises(ConfigError, match=r"config\.strategy\.corrected_fraction=1\.5"):
        run("multiagent_finetuning", pool, task, "dev", corrected_fraction=1.5)
    with pytest.raises(ConfigError, match=r"config\.strategy\.rounds=1"):
        run("multiagent_finetuning", pool, task, "dev", rounds=1)
