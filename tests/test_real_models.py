"""Real pretrained models (shipped inside PyPI packages): agora_jax logits vs transformers on the same GGUF,
and a pool of SmolLM2 copies running every text strategy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agora_jax.models import load
from agora_jax.strategies import make_strategy, prompts
from agora_jax.pool import Member, Pool
from agora_jax.tasks import evaluate, get_task
from test_strategies_text import TEXT_STRATEGIES, config
from hf_reference import gguf_reference
from stored_outputs import final_answers

CHAT = [{"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                    "clips in May. How many clips did Natalia sell altogether?"}]


def _compare(name: str, atol: float) -> None:
    model, tokenizer = load(name)
    reference = gguf_reference(name)
    ids = np.asarray([tokenizer.encode_chat(CHAT)])
    assert ids.shape[1] > 40
    ours = np.asarray(model(jnp.asarray(ids)))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= atol
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.xdist_group("gguf_reference")  # one conversion per file and process (tests/hf_reference.py)
def test_smollm2_135m_instruct_matches_transformers():
    _, tokenizer = load("smollm2-135m-instruct")
    prompt = tokenizer.format_chat(CHAT)
    assert prompt.startswith("<|im_start|>system\nYou are a careful") and prompt.endswith("<|im_start|>assistant\n")
    _compare("smollm2-135m-instruct", atol=1e-3)


@pytest.mark.slow
@pytest.mark.xdist_group("gguf_reference")
def test_gemma3_270m_matches_transformers():
    _compare("gemma3-270m", atol=1e-3)


# ---------------------------------------------------------------------- a SmolLM2 pool collaborating (slow)


@pytest.fixture(scope="module")
def smollm_pool():
    """SmolLM2-135M-Instruct and two copies differing by a LoRA seed: a random rank-8 adapter on q and v
    (A as peft initialises it, B ~ N(0, 0.05)) merged into each copy's weights."""
    from agora_jax.distill.lora import LoRAConfig, init_adapters, merge

    model, tokenizer = load("smollm2-135m-instruct")
    lora = LoRAConfig(rank=8, alpha=8.0, dropout=0.0, targets=("q", "v"))
    members = [Member("smollm2", model, tokenizer)]
    for seed in (1, 2):
        adapters = init_adapters(model.config, lora, jax.random.key(seed))
        adapters = {name: {**ab, "b": 0.05 * jax.random.normal(jax.random.key(100 + seed), ab["b"].shape)}
                    for name, ab in adapters.items()}
        members.append(Member(f"smollm2-lora{seed}", merge(model, adapters, lora), tokenizer))
    return Pool(members)


# In CI, the strategies with an assertion of their own below and the flagship debate (70-150 s each on the
# 2-core CI machine); every text strategy runs on tiny models in test_strategies_text.py and on scripted
# pools in test_strategies_scripted.py. AGORA_JAX_FULL_SMOLLM2=1: all of them, on the 8 items
# with 128-token answers.
FULL_SMOLLM2 = os.environ.get("AGORA_JAX_FULL_SMOLLM2") == "1"
SMOLLM2_STRATEGIES = TEXT_STRATEGIES if FULL_SMOLLM2 else ("debate", "multiagent_refine", "llm_blender", "agora")


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOLLM2_STRATEGIES)
def test_smollm2_pool_collaborates_as_its_algorithm_says(name, smollm_pool, data_root, tmp_path):
    """A text strategy on 4 mawps/addsub items, answers cut at 32 tokens: the members answer
    differently, and the final answers are what the strategy's algorithm makes of the real outputs in
    its transcript."""
    full = FULL_SMOLLM2
    task = get_task("mawps/addsub", n_dev=8 if full else 4, n_test=8 if full else 4)
    items = task.dev
    cfg = config(name)
    cfg.sampling.max_new_tokens = 128 if full else 32
    result = make_strategy(cfg, tmp_path).run(smollm_pool, task, "dev", jax.random.key(0))
    first = [t for t in result.transcript if t.round == 1]  # the members' first answers (moa: proposals)
    assert {(t.item_id, t.model) for t in first} == {(ex.id, m) for ex in items for m in smollm_pool.names}
    assert all(t.output_tokens > 0 for t in first)
    # the members answer differently (distinct weights, and distinct seeds for every request of a call)
    assert any(len({t.output for t in first if t.item_id == ex.id}) > 1 for ex in items)

    graded = evaluate(result.answers, task, "dev")
    derived = final_answers(name, result.transcript, items)  # a vote's or the final writer's, as transcribed
    if derived is not None:
        assert result.answers == derived
    if name == "multiagent_refine":  # the final writer is the member best on dev by its round-1 answers
        accuracy = {m: evaluate([t.output for t in first if t.model == m], task, "dev").accuracy
                    for m in smollm_pool.names}
        assert result.info["dev_accuracy"] == accuracy
        assert result.info["final_member"] == max(smollm_pool.names, key=lambda m: (accuracy[m], -smollm_pool.index(m)))
    if name == "llm_blender":  # the fuser saw the top-ranked answers, best first
        fused = {t.item_id: t.prompt for t in result.transcript if t.role == "fuse"}
        for ex, ranking in zip(items, result.info["rankings"]):
            said = {t.model: t.output for t in first if t.item_id == ex.id}
            assert fused[ex.id] == prompts.fuse(ex.messages, [said[m] for m in ranking[:cfg.top_k]])
    if name == "agora":  # it distills validated solutions its members wrote, to their peers and (lighter) the authors
        assert {(e.item_id, e.completion) for e in result.examples} <= {(t.item_id, t.output) for t in first}
        assert {e.source for e in result.examples} <= {"agora/peer", "agora/self"}
    print(name, graded.summary(), result.info.get("validated_rate", ""))
