"""Model family parity with transformers, export round trip, sharding, and bad-input errors."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from agora_jax.models import (CheckpointError, ModelConfig, UnsupportedModelError, create, load, preset, save_hf,
                              tiny_tokenizer)
from hf_reference import FAMILIES, left_padded_batch, make_hf_model, torch_logits

REPO = pathlib.Path(__file__).resolve().parents[1]


def _max_diff_at_real_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_on_left_padded_batch(family, tmp_path):
    reference = make_hf_model(family, tmp_path)
    ids, mask = left_padded_batch()
    model, tokenizer = load(tmp_path)
    assert tokenizer is None  # save_pretrained wrote no tokenizer files
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(reference, ids, mask)
    assert np.abs(theirs).max() > 0.5  # logits are not trivially small
    assert _max_diff_at_real_tokens(ours, theirs, mask) <= 1e-4


def test_sharded_safetensors_directory_loads(tmp_path):
    reference = make_hf_model("qwen2", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids, mask = left_padded_batch()
    model, _ = load(tmp_path)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_diff_at_real_tokens(ours, torch_logits(reference, ids, mask), mask) <= 1e-4


def test_bfloat16_load_tracks_float32(tmp_path):
    make_hf_model("llama", tmp_path)
    ids, mask = left_padded_batch()
    fp32, _ = load(tmp_path)
    bf16, _ = load(tmp_path, dtype="bfloat16")
    assert bf16.layers["q"][...].dtype == jnp.bfloat16
    a = np.asarray(fp32(jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(bf16(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
    assert _max_diff_at_real_tokens(a, b, mask) < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1))[mask.astype(bool)].mean() > 0.9


def test_float32_matmuls_ask_for_full_precision_and_bfloat16_does_not():
    """XLA's default precision is TF32 on recent GPUs and bf16 passes on TPU: a float32 model must ask
    for HIGHEST in every matmul to match transformers there; bfloat16 compute keeps the fast default."""
    ids = jnp.ones((2, 5), jnp.int32)
    for dtype, expected in (("float32", jax.lax.Precision.HIGHEST), ("bfloat16", jax.lax.Precision.DEFAULT)):
        model = create(dataclasses.replace(preset("tiny"), dtype=dtype), seed=0)
        jaxpr = jax.make_jaxpr(lambda i: model(i))(ids)
        dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        assert len(dots) >= 5  # q, k, v, o, MLP, attention, LM head
        for e in dots:
            precision = e.params["precision"]
            assert (precision[0] if precision else jax.lax.Precision.DEFAULT) == expected, (dtype, precision)


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (scan, jit, while bodies)."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("family", ["llama3_rope_bias", "qwen2", "qwen3", "gemma3", "mistral"])
def test_export_round_trip_through_transformers(family, tmp_path):
    make_hf_model(family, tmp_path / "src")
    model, _ = load(tmp_path / "src")
    save_hf(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="float32").eval()
    ids, mask = left_padded_batch()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_diff_at_real_tokens(ours, torch_logits(reloaded, ids, mask), mask) <= 1e-4
    again, tokenizer = load(tmp_path / "out")
    assert tokenizer is not None and tokenizer.decode(tokenizer.encode("12+7=19")) == "12+7=19"
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))), ours)


def test_export_of_a_fresh_preset_model(tmp_path):
    model = create(preset("tiny", vocab_size=264), seed=3)
    save_hf(model, tmp_path, tokenizer=tiny_tokenizer())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32").eval()
    ids, mask = left_padded_batch(vocab=264)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_diff_at_real_tokens(ours, torch_logits(reloaded, ids, mask), mask) <= 1e-4


SHARDING_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"  # eight host devices, also on a machine with an accelerator
    import jax, jax.numpy as jnp, numpy as np
    sys.path[:0] = [{tests!r}, {repo!r}]
    from jax.sharding import NamedSharding, PartitionSpec as P
    from agora_jax.models import load, make_mesh
    from hf_reference import make_hf_model, left_padded_batch
    assert len(jax.devices()) == 8
    make_hf_model({family!r}, {dir!r})
    ids, mask = left_padded_batch()
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])  # batch 6
    single, _ = load({dir!r})
    expected = np.asarray(jax.jit(lambda m, i, k: m(i, k))(single, ids, mask))
    for shape in [dict(data=1, fsdp=2, tensor=4), dict(data=2, fsdp=2, tensor=2)]:
        mesh = make_mesh(**shape)
        model, _ = load({dir!r}, mesh=mesh)
        q = model.layers["q"][...]
        assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape != q.shape, q.sharding
        batch = NamedSharding(mesh, P("data"))
        got = np.asarray(jax.jit(lambda m, i, k: m(i, k))(model, jax.device_put(ids, batch), jax.device_put(mask, batch)))
        diff = np.abs(got - expected)[mask.astype(bool)].max()
        print(shape, diff)
        assert diff <= 1e-5, (shape, diff)
    print("OK")
""")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_eight_device_mesh_matches_one_device(family, tmp_path):
    script = SHARDING_SCRIPT.format(tests=str(REPO / "tests"), repo=str(REPO), family=family, dir=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-3000:]


# ---------------------------------------------------------------------------------------- bad input


def test_unsupported_architecture_is_named(tmp_path):
    make_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'.*GPT2LMHeadModel"):
        load(tmp_path)


def test_unsupported_rope_scaling_is_named():
    with pytest.raises(UnsupportedModelError, match="rope_type='yarn'"):
        ModelConfig.from_hf({**{k: 8 for k in ("vocab_size", "hidden_size", "intermediate_size")},
                             "num_hidden_layers": 1, "num_attention_heads": 2, "model_type": "llama",
                             "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    make_hf_model("llama", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated .*tensor '.*'"):
        load(tmp_path)


def test_missing_tensor_names_tensor_and_directory(tmp_path):
    import safetensors.numpy

    make_hf_model("qwen2", tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}.*'model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        load(tmp_path)


def test_shape_mismatch_names_tensor(tmp_path):
    make_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensor 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape .* the config expects"):
        load(tmp_path)


def test_unknown_name_is_refused_with_the_known_names():
    with pytest.raises(CheckpointError, match="no such file or directory, registry name .*smollm2-135m-instruct"):
        load("./definitely/not/here")


# ---------------------------------------------------------------------------------------- tokenizers


def test_tiny_tokenizer_round_trip_and_chat_format(tmp_path):
    tok = tiny_tokenizer()
    text = "Janet has 3 ducks; 2+2=4. Ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("abc")) == 3  # bytes, no merges
    prompt = tok.format_chat([{"role": "user", "content": "1+1="}])
    assert prompt == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.format_completion("2") == "2<|im_end|>\n"
    assert tok.hf.convert_tokens_to_ids("<|im_end|>") in tok.stop_ids
    tok.save(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(prompt, add_special_tokens=False) == tok.encode(prompt)


def test_plain_format_for_base_models():
    tok = tiny_tokenizer()
    tok.hf.chat_template = None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    assert tok.format_chat(messages) == "<s>Be brief.\n\nUser: 2+3?\nAssistant:"
    assert tok.stop_strings == ("\nUser:",)
    assert tok.format_completion(" 5 ") == " 5\n"
