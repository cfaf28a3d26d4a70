"""Greedy decoding token-identical to transformers `generate`: tiny random models of every family
(left-padded batch; sliding windows shorter than the generation) and SmolLM2-135M-Instruct."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from agora_jax.models import load, tiny_tokenizer
from agora_jax.sampling import Engine, SamplingParams
from hf_reference import gguf_reference, make_hf_model

NEW_TOKENS = 32


def hf_greedy(model: transformers.PreTrainedModel, prompts: list[list[int]], pad_id: int,
              stop_at_eos: bool = False) -> list[list[int]]:
    """transformers' greedy continuation of each left-padded prompt (one batch)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=pad_id)
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_tiny_families_match_transformers(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    if family in ("mistral", "gemma3"):
        assert 0 < hf.config.sliding_window < NEW_TOKENS
    model, _ = load(tmp_path)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, hf.config.vocab_size, n).tolist() for n in (11, 6, 3)]
    ours = Engine(model, tiny_tokenizer()).generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                             stop_token_ids=()))
    assert [cs[0].tokens for cs in ours] == hf_greedy(hf, prompts, pad_id=0)


@pytest.mark.slow
@pytest.mark.xdist_group("gguf_reference")  # one conversion per file and process (tests/hf_reference.py)
def test_smollm2_matches_transformers():
    model, tokenizer = load("smollm2-135m-instruct")
    hf = gguf_reference("smollm2-135m-instruct")
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain photosynthesis to a child.", "What is 17 times 23? Show your steps."]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    ours = Engine(model, tokenizer).generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, completions in zip(prompts, ours):  # the reference one prompt at a time, unpadded
        reference = hf_greedy(hf, [prompt], tokenizer.pad_id, stop_at_eos=True)[0]
        tokens = completions[0].tokens
        assert tokens == reference[:len(tokens)]
        assert completions[0].finish_reason == "length" or tokens[-1] in tokenizer.stop_ids
