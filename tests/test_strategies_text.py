"""Text strategies: end to end on tiny-model pools (real engine, deterministic given the seed), and the
decision logic on scripted pools whose replies and likelihoods are planted (votes, rankings, peer
verification, AGORA memory and elite-peer learning, refine's dev-chosen writer; MAFT's data by role is in
test_strategies_scripted.py)."""

from __future__ import annotations

import json
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from agora_jax.models import create, tiny_tokenizer
from agora_jax.sampling import Completion
from agora_jax.strategies import STRATEGIES, make_strategy, read_transcript, write_transcript
from agora_jax.strategies.answers import answer_key, vote, weighted_vote
from agora_jax.strategies import agora as agora_lib
from agora_jax.strategies import prompts
from agora_jax.strategies.llm_blender import rank
from agora_jax.pool import Member, Pool, completion_logprobs
from agora_jax.tasks import Example, evaluate, get_task

TEXT_STRATEGIES = ("self_consistency", "debate", "multiagent_refine", "llm_blender", "multiagent_finetuning", "moa",
                   "agora")
TOK = tiny_tokenizer()


def config(name: str, **overrides):
    cfg = STRATEGIES[name].defaults()
    cfg.sampling.max_new_tokens = 8
    if "samples" in cfg:
        cfg.samples = 2
    cfg.update(overrides)
    return cfg


def test_every_strategy_fills_a_partial_config_from_its_defaults():
    for name, cls in STRATEGIES.items():
        assert cls.defaults().name == name
        strategy = make_strategy(ml_collections.ConfigDict(dict(name=name, sampling=dict(max_new_tokens=7))))
        assert strategy.config.sampling.max_new_tokens == 7  # given
        assert strategy.config.sampling.temperature == cls.defaults().sampling.temperature  # from the defaults
        assert set(strategy.config) == set(cls.defaults())


@pytest.fixture(scope="module")
def task():
    return get_task("synthetic", digits=2, steps=2, n_dev=3, n_test=2)


@pytest.fixture(scope="module")
def tiny_members():
    return [Member(f"m{i}", create("tiny", seed=i), TOK) for i in range(3)]


@pytest.fixture(scope="module")
def tiny_pool(tiny_members):
    # module scope: the engines' compiled programs are reused across tests; one prompt-length bucket
    # (prompts here stay under 512 tokens) keeps the number of compiled programs small
    return Pool(tiny_members, engine_options=dict(min_prompt_len=512))


# ---------------------------------------------------------------------- scripted pools


class Scripted:
    """A pool backend replying `reply(member, messages, sample)`; records every call's requests."""

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[list[tuple[int, list[dict]]]] = []

    def __call__(self, pool, members, prompts_, params):
        self.calls.append(list(zip(members, prompts_)))
        out = []
        for m, messages in zip(members, prompts_):
            texts = [self.reply(m, messages, j) for j in range(params.n)]
            out.append([Completion(t, TOK.encode(t), [-0.5] * len(TOK.encode(t)), "stop") for t in texts])
        return out


class OraclePool(Pool):
    """A scripted pool whose likelihoods come from `oracle(member, messages, completion)`."""

    def __init__(self, members, reply, oracle=None, generation=0):
        super().__init__(members, generation, backend=Scripted(reply))
        self.oracle = oracle

    def score_batch(self, requests, reduce="sum", whole_turn=True):
        return [self.oracle(m, msgs, c) for m, msgs, c in requests]


def last_user(messages) -> str:
    return [m for m in messages if m["role"] == "user"][-1]["content"]


def question_of(messages) -> str:
    """The item's question, from the original messages or from a judge/verifier prompt."""
    text = last_user(messages)
    found = re.match(r"Question:\n(.*?)\n\n", text, re.S)
    return found.group(1) if found else messages[0]["content"].split("\n\n")[0]


NUMBER_ITEM = Example("x", "x", [], "0", "number")


def is_correct(solution: str, gold: str) -> bool:
    return vote([solution], NUMBER_ITEM)[1] == answer_key(gold, "number")


def gold_of(task):
    return {ex.question: ex.answer for split in ("dev", "test") for ex in task.split(split)}


# ---------------------------------------------------------------------- end to end, real engine


@pytest.mark.parametrize("name", TEXT_STRATEGIES)
def test_runs_end_to_end_and_is_deterministic(name, tiny_pool, task, tmp_path):
    items = task.split("dev")
    runs = [make_strategy(config(name), tmp_path / f"run{k}").run(tiny_pool, task, "dev", jax.random.key(7))
            for k in range(2)]
    first, second = runs
    assert first.answers == second.answers
    assert first.transcript == second.transcript
    assert first.examples == second.examples
    assert len(first.answers) == len(items)
    assert evaluate(first.answers, task, "dev").n == len(items)
    assert {t.item_id for t in first.transcript} == {ex.id for ex in items}
    assert {t.model for t in first.transcript if t.round == 1} == set(tiny_pool.names)  # every member answered
    for turn in first.transcript:
        assert turn.prompt_tokens > 0 and turn.prompt[-1]["role"] == "user"
        if turn.role in ("answer", "debate", "refine", "propose", "aggregate", "fuse", "final"):
            assert 0 < turn.output_tokens <= 8 and len(turn.logprobs) == turn.output_tokens


def test_seed_changes_samples(tiny_pool, task):
    strategy = make_strategy(config("debate"))
    a = strategy.run(tiny_pool, task, "dev", jax.random.key(0))
    b = strategy.run(tiny_pool, task, "dev", jax.random.key(1))
    assert [t.output for t in a.transcript] != [t.output for t in b.transcript]


def test_transcript_jsonl_roundtrip(tiny_pool, task, tmp_path):
    result = make_strategy(config("llm_blender")).run(tiny_pool, task, "dev", jax.random.key(0))
    path = tmp_path / "transcript.jsonl"
    write_transcript(result.transcript, path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(result.transcript) and json.loads(lines[0])["role"] == "answer"
    assert read_transcript(path) == result.transcript


def test_score_matches_a_direct_forward(tiny_members):
    pool = Pool(tiny_members)
    messages = [{"role": "user", "content": "12+7="}]
    prompt, completion = TOK.encode_chat(messages), TOK.encode("19<|im_end|>\n")  # the whole assistant turn
    logits = nnx.jit(lambda model, ids: model(ids))(tiny_members[1].model, jax.numpy.asarray([prompt + completion]))[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    expected = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion))
    got = pool.score_batch([(1, messages, "19"), (0, messages, "a longer reply"), (1, messages, "19")])
    assert got[0] == pytest.approx(expected, abs=1e-4) and got[2] == pytest.approx(expected, abs=1e-4)
    assert pool.score(1, messages, "19", reduce="mean") == pytest.approx(expected / len(completion), abs=1e-4)
    start = float(logp[len(prompt) - 1, completion[0]]) + float(logp[len(prompt), completion[1]])
    assert pool.score(1, messages, "19", whole_turn=False) == pytest.approx(start, abs=1e-4)


def test_completion_logprobs_share_rows_and_match_full_forwards(tiny_members):
    model = tiny_members[0].model
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(5, 260, rng.integers(1, 24)).tolist(), rng.integers(5, 260, rng.integers(1, 5)).tolist())
             for _ in range(8)]
    pairs += [(pairs[0][0], [7]), (pairs[0][0], [9]), (pairs[0][0], pairs[0][1][:1])]  # one shared row
    got = completion_logprobs(model, pairs, max_batch_tokens=64)  # several batches and shapes
    ids = np.zeros((len(pairs), 32), np.int32)  # reference: one right-padded full forward
    mask = np.zeros((len(pairs), 32), bool)
    for r, (prompt, completion) in enumerate(pairs):
        ids[r, :len(prompt) + len(completion)], mask[r, :len(prompt) + len(completion)] = prompt + completion, True
    full = nnx.jit(lambda m, x, y: jax.nn.log_softmax(m(x, y), axis=-1))(model, ids, mask)
    for r, ((prompt, completion), lp) in enumerate(zip(pairs, got)):
        expected = [float(full[r, len(prompt) - 1 + t, tok]) for t, tok in enumerate(completion)]
        np.testing.assert_allclose(lp, expected, atol=1e-4)


# ---------------------------------------------------------------------- votes


def test_majority_vote_rules():
    ex = NUMBER_ITEM
    assert vote(["5", "7", "7", "5"], ex) == (0, "5")  # tie: the earliest answer wins
    assert vote(["no number", "7", "so 7.0", "5"], ex) == (1, "7")  # "7.0" and "7" are one vote; None never wins
    assert vote(["none", "nothing"], ex) == (None, None)


def test_weighted_vote_sums_probabilities_in_log_space():
    # 7: e^-1 + e^-1 = 0.74 beats 5: e^-0.5 = 0.61; its most probable holder (index 2) is returned
    assert weighted_vote(["5", "7", "7"], [-0.5, -1.0, -0.9]) == (2, "7")
    assert weighted_vote(["5", "7", "7"], [-0.1, -1.0, -1.0]) == (0, "5")  # 0.90 beats 0.74
    # replies of a thousand tokens: e^-1000 underflows in float64, their log-sum does not
    assert weighted_vote(["5", "7", "7"], [-1000.0, -1000.5, -1000.5]) == (1, "7")
    assert weighted_vote(["7", "5"], [-1.0, -1.0]) == (0, "7")  # tie: the answer seen first
    assert weighted_vote([None, "5"], [0.0, -9.0]) == (1, "5")  # None never wins
    assert weighted_vote([None, None], [0.0, 0.0]) == (None, None)
    # holder_scores pick which holder of the winning answer is returned, not the winner
    assert weighted_vote(["7", "5", "7"], [0.0] * 3, holder_scores=[-3.0, -0.1, -2.0]) == (2, "7")
    assert weighted_vote(["7", "5", "7"], [0.0] * 3, holder_scores=[-2.0, -0.1, -2.0]) == (0, "7")  # tie: earliest
    with pytest.raises(ValueError, match="2 answers for 1 weights"):
        weighted_vote(["5", "7"], [0.0])


def test_debate_votes_and_calls_engine_once_per_round(tiny_members, task):
    items = task.split("dev")
    gold = gold_of(task)
    # m0 and m2 are right, m1 is wrong in every round
    pool = OraclePool(tiny_members, lambda m, msgs, j: str(int(gold[question_of(msgs)]) + (m == 1)))
    result = make_strategy(config("debate", rounds=3)).run(pool, task, "dev", jax.random.key(0))
    assert len(pool._backend.calls) == 3 and all(len(c) == 3 * len(items) for c in pool._backend.calls)
    assert evaluate(result.answers, task, "dev").accuracy == 1.0
    assert [e.completion for e in result.examples] == [ex.answer for ex in items]
    assert all(e.messages == ex.messages for e, ex in zip(result.examples, items))
    debate_prompt = pool._backend.calls[1][1][1]  # round 2, item 0, agent m1: own answer + the others'
    assert debate_prompt[-2] == {"role": "assistant", "content": str(int(items[0].answer) + 1)}
    assert last_user(debate_prompt).count(items[0].answer) == 2


def test_debate_pool_likelihood_picks_what_the_pool_believes_over_the_majority(tiny_members, task):
    items, gold = task.split("dev"), gold_of(task)
    reply = lambda m, msgs, j: str(int(gold[question_of(msgs)]) + (m != 2))  # noqa: E731  only m2 is right

    def oracle(m, msgs, completion):  # m2 is sure of the right answer; m0 and m1 only lean to theirs
        right = completion == gold[question_of(msgs)]
        return (0.0 if right else -10.0) if m == 2 else (-2.0 if right else -1.0)

    voted = make_strategy(config("debate", rounds=1)).run(OraclePool(tiny_members, reply, oracle), task, "dev",
                                                          jax.random.key(0))
    assert evaluate(voted.answers, task, "dev").accuracy == 0.0  # two wrong agents out-vote one right
    ranked = make_strategy(config("debate", rounds=1, select="pool_likelihood")).run(
        OraclePool(tiny_members, reply, oracle), task, "dev", jax.random.key(0))
    assert evaluate(ranked.answers, task, "dev").accuracy == 1.0  # summed: right -4, wrong -12
    assert [e.completion for e in ranked.examples] == [ex.answer for ex in items]
    with pytest.raises(ValueError, match="select"):
        make_strategy(config("debate", select="best")).run(OraclePool(tiny_members, reply, oracle), task, "dev",
                                                           jax.random.key(0))


def test_self_consistency_votes_across_members(tiny_members, task):
    gold = gold_of(task)
    # per member, sample 0 is wrong and samples 1.. are right: 3 wrong votes vs 6 right ones
    pool = OraclePool(tiny_members, lambda m, msgs, j: str(int(gold[question_of(msgs)]) + 10 * (j == 0) + m * (j == 0)))
    result = make_strategy(config("self_consistency", samples=3)).run(pool, task, "dev", jax.random.key(0))
    assert len(pool._backend.calls) == 1
    assert evaluate(result.answers, task, "dev").accuracy == 1.0


# ---------------------------------------------------------------------- llm_blender


@pytest.mark.parametrize("judge", ["generate", "likelihood"])
def test_blender_ranks_the_planted_answer_first(judge, tiny_members, task):
    gold = gold_of(task)

    def answer(m, msgs, j):  # m1 holds the planted right answer; m0, m2 are wrong
        text = last_user(msgs)
        if "Which answer is more correct" in text:
            a = re.search(r"Answer A:\n(.*?)\n\nAnswer B", text, re.S).group(1)
            return "A" if is_correct(a, gold[question_of(msgs)]) else "B"
        if "Candidate answers, best first" in text:
            return re.search(r"Answer 1:\n(.*?)\n", text).group(1)  # the fuser copies the top answer
        return str(int(gold[question_of(msgs)]) + (0 if m == 1 else 3 + m))

    def likelihood(m, msgs, completion):  # the ranker prefers the letter of the right answer
        a = re.search(r"Answer A:\n(.*?)\n\nAnswer B", last_user(msgs), re.S).group(1)
        return -1.0 if (completion == "A") == is_correct(a, gold[question_of(msgs)]) else -3.0

    pool = OraclePool(tiny_members, answer, likelihood)
    result = make_strategy(config("llm_blender", judge=judge)).run(pool, task, "dev", jax.random.key(0))
    assert all(r[0] == "m1" for r in result.info["rankings"])
    assert all(w[1] == pytest.approx(4.0 if judge == "generate" else 4 * 0.8808, abs=1e-3)
               for w in result.info["wins"])
    assert evaluate(result.answers, task, "dev").accuracy == 1.0
    assert len(pool._backend.calls) == (3 if judge == "generate" else 2)


def test_rank_breaks_ties_by_member_order():
    assert rank([1.0, 2.0, 2.0, 0.5]) == [1, 2, 0, 3]


# ---------------------------------------------------------------------- multiagent_refine / MoA


def test_refine_final_writer_is_best_on_dev_and_cached(tiny_members, task, tmp_path):
    gold = gold_of(task)

    def answer(m, msgs, j):  # round 1: only m1 is right; the final writer copies candidate 2
        text = last_user(msgs)
        if "Candidate answers from several models" in text:
            return re.search(r"Answer 2:\n(.*?)\n", text).group(1)
        return str(int(gold[question_of(msgs)]) + (m != 1))

    strategy = make_strategy(config("multiagent_refine"), tmp_path)
    pool = OraclePool(tiny_members, answer)
    dev = strategy.run(pool, task, "dev", jax.random.key(0))
    assert dev.info["final_member"] == "m1" and dev.info["dev_accuracy"] == {"m0": 0.0, "m1": 1.0, "m2": 0.0}
    assert {t.model for t in dev.transcript if t.role == "final"} == {"m1"}
    assert evaluate(dev.answers, task, "dev").accuracy == 1.0
    assert (tmp_path / "strategy/multiagent_refine/gen0/best_model.json").exists()

    cached = OraclePool(tiny_members, answer)
    test = strategy.run(cached, task, "test", jax.random.key(0))
    assert test.info["final_member"] == "m1" and len(cached._backend.calls) == 3  # no extra dev round
    fresh = OraclePool(tiny_members, answer, generation=1)  # no cache for generation 1: measured on dev first
    assert strategy.run(fresh, task, "test", jax.random.key(0)).info["final_member"] == "m1"
    assert len(fresh._backend.calls) == 4
    assert {question_of(msgs) for _, msgs in fresh._backend.calls[2]} == {ex.question for ex in task.dev}


def test_moa_layers_see_all_previous_outputs(tiny_members, task):
    pool = OraclePool(tiny_members, lambda m, msgs, j: f"m{m}-says-{len(msgs[-1]['content'])}")
    result = make_strategy(config("moa", layers=2, aggregator=2)).run(pool, task, "dev", jax.random.key(0))
    calls = pool._backend.calls
    assert [len(c) for c in calls] == [3 * len(task.dev), 3 * len(task.dev), len(task.dev)]
    assert {m for m, _ in calls[-1]} == {2}
    layer2 = [o for o in result.transcript if o.round == 2 and o.item_id == task.dev[0].id]
    assert all(f"Answer {k + 1}:\nm{k}-says" in last_user(msgs) for k in range(3) for _, msgs in calls[-1][:1])
    assert result.answers[0] == [t.output for t in result.transcript if t.role == "aggregate"][0]
    assert len(layer2) == 3


# ---------------------------------------------------------------------- AGORA


def agora_replies(task, wrong=lambda m, i: m == 2, style=lambda m: "{}"):
    """Agent m answers item i wrong when `wrong(m, i)`; verifiers say Yes exactly to right solutions."""
    gold = gold_of(task)
    index = {ex.question: i for split in ("dev", "test") for i, ex in enumerate(task.split(split))}

    def reply(m, msgs, j):
        text = last_user(msgs)
        if "Is this solution correct?" in text:
            solution = re.search(r"Proposed solution:\n(.*?)\n\nIs this", text, re.S).group(1)
            return "Yes" if is_correct(solution, gold[question_of(msgs)]) else "No"
        q = question_of(msgs)
        return style(m).format(int(gold[q]) + 7 * wrong(m, index[q]))

    def likelihood(m, msgs, completion):
        text = last_user(msgs)
        if "Is this solution correct?" in text:
            solution = re.search(r"Proposed solution:\n(.*?)\n\nIs this", text, re.S).group(1)
            return -0.1 if (completion == "Yes") == is_correct(solution, gold[question_of(msgs)]) else -4.0
        return -0.1 if completion == gold[question_of(msgs)] else -4.0  # verify="likelihood": p(answer)

    return reply, likelihood


@pytest.mark.parametrize("verify,judge", [("judge", "generate"), ("judge", "likelihood"), ("likelihood", "generate")])
def test_agora_validates_planted_right_solutions_only(verify, judge, tiny_members, task, tmp_path):
    reply, likelihood = agora_replies(task, style=lambda m: ["{}", "The answer is {}.", "So {}"][m])
    pool = OraclePool(tiny_members, reply, likelihood)
    result = make_strategy(config("agora", verify=verify, judge=judge), tmp_path).run(pool, task, "dev",
                                                                                     jax.random.key(0))
    memory = [json.loads(line) for line in (tmp_path / "strategy/agora/memory.jsonl").read_text().splitlines()]
    gold = {ex.id: ex.answer for ex in task.dev}
    assert memory and all(e["answer"] == gold[e["item_id"]] for e in memory)
    assert {e["author"] for e in memory} == {"m0", "m1"}  # m2's wrong solutions were rejected by its peers
    assert len(memory) == 2 * len(task.dev)  # k=2 identical samples per agent: deduplicated by text
    assert result.info["validated_rate"] == {"m0": 1.0, "m1": 1.0, "m2": 0.0}
    assert evaluate(result.answers, task, "dev").accuracy == 1.0
    peers = [e for e in result.examples if e.source == "agora/peer"]
    assert {e.targets for e in peers} == {("m1", "m2"), ("m0", "m2")}
    assert all(e.weight == 0.5 and len(e.targets) == 1 for e in result.examples if e.source == "agora/self")
    assert len(pool._backend.calls) == (2 if verify == "judge" and judge == "generate" else 1)


def test_agora_memory_deduplicates_and_persists(tiny_members, task, tmp_path):
    reply, _ = agora_replies(task)
    path = tmp_path / "strategy/agora/memory.jsonl"
    make_strategy(config("agora"), tmp_path).run(OraclePool(tiny_members, reply), task, "dev", jax.random.key(0))
    first = path.read_text().splitlines()
    assert len(first) == len(task.dev)  # m0 and m1 say the same text: one entry per item
    # generation 1, a fresh strategy object (a restart): the same solutions add nothing; new wording adds
    again = make_strategy(config("agora"), tmp_path).run(OraclePool(tiny_members, reply, generation=1), task, "dev",
                                                         jax.random.key(1))
    assert path.read_text().splitlines() == first and again.info["new_in_memory"] == 0
    assert again.info["memory_size"] == len(task.dev) and len(again.examples) == 2 * len(task.dev)
    reworded, _ = agora_replies(task, style=lambda m: "The answer is {}." if m == 1 else "{}")
    third = make_strategy(config("agora"), tmp_path).run(OraclePool(tiny_members, reworded, generation=2), task,
                                                         "dev", jax.random.key(2))
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert third.info["new_in_memory"] == len(task.dev) and len(entries) == 2 * len(task.dev)
    assert [e["generation"] for e in entries] == [0] * len(task.dev) + [2] * len(task.dev)
    state = json.loads((tmp_path / "strategy/agora/state.json").read_text())
    assert sorted(state["dev_accuracy"]) == ["0", "1", "2"]
    # a test run neither writes memory nor proposes training data
    test = make_strategy(config("agora"), tmp_path).run(OraclePool(tiny_members, reply, generation=2), task,
                                                        "test", jax.random.key(3))
    assert test.examples == [] and len(path.read_text().splitlines()) == len(entries)


def test_agora_stall_and_elite_selection():
    assert agora_lib.stalled([0.5, 0.5, 0.5], patience=2)
    assert agora_lib.stalled([0.6, 0.5, 0.6], patience=2)
    assert not agora_lib.stalled([0.5, 0.5], patience=2)
    assert not agora_lib.stalled([0.5, 0.4, 0.6], patience=2)
    assert agora_lib.elite_agents([0.1, 0.9, 0.5, 0.9], 2) == [1, 3]
    assert agora_lib.elite_agents([0.5, 0.5, 0.5], 2) == [0, 1]


def test_agora_switches_to_elite_peers_after_patience(tiny_members, task, tmp_path):
    # m0, m1 right everywhere (different wording: no dedup between them); m2 right on item 0 only
    reply, _ = agora_replies(task, wrong=lambda m, i: m == 2 and i > 0,
                             style=lambda m: ["{}", "The answer is {}.", "So {}"][m])
    results = [make_strategy(config("agora", patience=2, elite_k=2), tmp_path).run(
        OraclePool(tiny_members, reply, generation=g), task, "dev", jax.random.key(g)) for g in range(3)]
    assert [r.info["elite"] for r in results] == [None, None, ["m0", "m1"]]  # flat dev accuracy for 2 steps
    authors = [{e.completion for e in r.examples} for r in results]
    m2_text = f"So {task.dev[0].answer}"
    assert m2_text in authors[0] and m2_text in authors[1]  # m2's validated solution is training data ...
    assert m2_text not in authors[2]  # ... until elite-peer learning keeps only the top-2 agents'
    assert results[2].examples and all(e.source != "agora/memory" for e in results[2].examples)
    assert results[2].info["validated_rate"]["m2"] == pytest.approx(1 / len(task.dev))


# ---------------------------------------------------------------------- prompts


def test_prompts_keep_the_question_and_parse_verdicts():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
    for built in (prompts.synthesize(messages, ["4", "5"]), prompts.fuse(messages, ["4"])):
        assert built[0] == messages[0] and last_user(built).startswith("2+2=\n\n") and messages[1]["content"] == "2+2="
    assert prompts.debate(messages, "4", ["5"])[2] == {"role": "assistant", "content": "4"}
    assert prompts.first_option(" **Yes**, it is.", prompts.VERDICTS) == 0
    assert prompts.first_option("B.", prompts.JUDGE_OPTIONS) == 1
    assert prompts.first_option("Maybe", prompts.VERDICTS) is None

