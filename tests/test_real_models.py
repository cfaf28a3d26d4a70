"""Real pretrained models (shipped inside PyPI packages): agora_jax logits vs transformers on the same GGUF."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from agora_jax.models import load
from agora_jax.models.registry import resolve

CHAT = [{"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                    "clips in May. How many clips did Natalia sell altogether?"}]


def _compare(name: str, atol: float) -> None:
    path = resolve(name)
    model, tokenizer = load(name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = np.asarray([tokenizer.encode_chat(CHAT)])
    assert ids.shape[1] > 40
    ours = np.asarray(model(jnp.asarray(ids)))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= atol
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_135m_instruct_matches_transformers():
    _, tokenizer = load("smollm2-135m-instruct")
    prompt = tokenizer.format_chat(CHAT)
    assert prompt.startswith("<|im_start|>system\nYou are a careful") and prompt.endswith("<|im_start|>assistant\n")
    _compare("smollm2-135m-instruct", atol=1e-3)


@pytest.mark.slow
def test_gemma3_270m_matches_transformers():
    _compare("gemma3-270m", atol=1e-3)
