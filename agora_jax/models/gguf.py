"""Reading llama.cpp GGUF checkpoints as Hugging Face configs, tensors and tokenizers, without torch.

`GGUFCheckpoint(path)` parses only the file's metadata and tensor table (the file is memory-mapped);
`get(name)` dequantises one tensor on demand and returns it in the Hugging Face convention, undoing
the two value changes llama.cpp's converter makes:

- llama-arch q_proj / k_proj rows are permuted (rotary halves interleaved per head);
- Gemma 3 RMSNorm weights are stored as `w + 1` (HF's Gemma3RMSNorm multiplies by `1 + w`).

transformers' own GGUF loading (`modeling_gguf_pytorch_utils.py`) is the reference these match.

The metadata is read with a small parser of our own rather than `gguf.GGUFReader`, which builds a
numpy view per vocabulary string and takes ~15 s to open the Gemma 3 file (262k tokens) against
~0.3 s here; dequantisation is `gguf.quants.dequantize`.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from agora_jax.models.errors import CheckpointError

if TYPE_CHECKING:
    import transformers

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# metadata value type id -> struct format (fixed-size types); 8 is string, 9 is array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class _Arch:
    """How one llama.cpp architecture maps onto its Hugging Face model."""

    model_type: str
    hf_class: str
    layer_tensors: Mapping[str, str]  # GGUF name after "blk.{i}." -> HF name after "model.layers.{i}."
    permute_qk: bool = False  # llama.cpp permuted q/k rows for its rotary layout
    norm_offset: float = 0.0  # llama.cpp stored norm weights as w + norm_offset


_DECODER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QKV_BIAS = {f"attn_{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}
_QK_NORM = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
# Gemma 3 has sandwich norms: llama.cpp's ffn_norm is the pre-MLP norm there.
_GEMMA3_NORMS = {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}

_LLAMA = _Arch("llama", "LlamaForCausalLM", _DECODER_LAYER, permute_qk=True)
_MISTRAL = _Arch("mistral", "MistralForCausalLM", _DECODER_LAYER, permute_qk=True)
_ARCHS = {
    "llama": _LLAMA,
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _DECODER_LAYER | _QKV_BIAS),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", _DECODER_LAYER | _QK_NORM),
    "gemma3": _Arch("gemma3_text", "Gemma3ForCausalLM", _DECODER_LAYER | _QK_NORM | _GEMMA3_NORMS, norm_offset=1.0),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Gemma 3's default layer pattern when the file does not state one: 5 sliding layers, then 1 global.
_GEMMA3_SLIDING_PERIOD = 6
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0

# tokenizer keys transformers names its special tokens by, and the GGUF keys holding their ids
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dims fastest-moving first)
    qtype: gguf.GGMLQuantizationType
    start: int  # absolute byte offset in the file
    nbytes: int


class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint: `hf_config`, `tensor_names()`, `get()`, `tokenizer()`."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.metadata, self._tensors = _read_header(self._map)
        except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from e
        self._file_arch = self._meta("general.architecture")
        self._arch = _resolve_arch(self._file_arch, self.metadata.get("general.name", ""), self.path)
        self.hf_config = self._hf_config()
        self._to_gguf = self._name_map()
        self._check_tensor_table()

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, arch={self._file_arch!r})"

    def tensor_names(self) -> list[str]:
        """HF parameter names of the model, in layer order (`lm_head.weight` only when untied)."""
        return list(self._to_gguf)

    def get(self, hf_name: str) -> np.ndarray:
        """One parameter, dequantised to float32 in HF layout and convention (read from the file on each call)."""
        gguf_name = self._to_gguf.get(hf_name)
        if gguf_name is None:
            raise CheckpointError(f"{self.path}: {hf_name!r} is not a tensor of this {self._arch.model_type} model")
        info = self._tensors.get(gguf_name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {hf_name!r} (GGUF {gguf_name!r}) is missing from the file")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.start)
        block, block_bytes = gguf.GGML_QUANT_SIZES[info.qtype]
        raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * block_bytes)
        try:
            w = gguf.quants.dequantize(raw, info.qtype)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {gguf_name!r}: {e}") from e
        if np.shares_memory(w, raw):  # F32 is returned as a view of the read-only map
            w = w.copy()
        w = w.astype(np.float32, copy=False).reshape(info.shape)
        expected = self._expected_shape(hf_name)
        if w.shape != expected:
            raise CheckpointError(
                f"{self.path}: tensor {hf_name!r} (GGUF {gguf_name!r}) has shape {w.shape}, config implies {expected}"
            )
        if self._arch.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.hf_config["num_attention_heads" if "q_proj" in hf_name else "num_key_value_heads"]
            w = _unpermute_rotary_rows(w, heads)
        if self._arch.norm_offset and hf_name.endswith("norm.weight"):
            w -= self._arch.norm_offset
        return w

    def tokenizer(self) -> "transformers.PreTrainedTokenizerFast":
        """The tokenizer described by the file's metadata, built as transformers' GGUF loading builds it.

        transformers' own `AutoTokenizer.from_pretrained(..., gguf_file=...)` reads the file through
        torch; this reuses its metadata-to-tokenizer conversion without that.
        """
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

        groups = {
            group: {name: self.metadata[f"tokenizer.{key}"] for key, name in keys.items()
                    if f"tokenizer.{key}" in self.metadata}
            for group, keys in GGUF_TOKENIZER_MAPPING.items()
        }
        tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
        if "tokens" not in tokenizer_dict:
            raise CheckpointError(f"{self.path}: no tokenizer.ggml.tokens in the metadata")
        if tokenizer_dict.get("tokenizer_type") == "llama":
            # llama.cpp adds BOS for a sentencepiece vocabulary that does not say otherwise
            tokenizer_config.setdefault("add_bos_token", True)
        for name, key in _SPECIAL_TOKENS.items():
            token_id = self.metadata.get(f"tokenizer.ggml.{key}")
            tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
        try:
            backend, extra = convert_gguf_tokenizer(self._file_arch, tokenizer_dict)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tokenizer: {e}") from e
        # the class AutoTokenizer picks for this model type (MistralCommonBackend needs mistral files)
        class_name = TOKENIZER_MAPPING_NAMES.get(self._arch.model_type)
        cls = tokenizer_class_from_name(class_name) if class_name not in (None, "MistralCommonBackend") else None
        return (cls or PreTrainedTokenizerFast)(tokenizer_object=backend, **tokenizer_config, **extra)

    # -- metadata -> HF config ------------------------------------------------------------------------

    def _meta(self, key: str, default: Any = ...) -> Any:
        if key in self.metadata:
            return self.metadata[key]
        if default is ...:
            raise CheckpointError(f"{self.path}: metadata field {key!r} is missing")
        return default

    def _hf_config(self) -> dict[str, Any]:
        arch = self._file_arch
        key = lambda name, default=...: self._meta(f"{arch}.{name}", default)  # noqa: E731
        hidden, heads = key("embedding_length"), key("attention.head_count")
        head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden // heads
        if "rope_freqs.weight" in self._tensors:
            raise CheckpointError(f"{self.path}: tensor 'rope_freqs.weight' (llama3 rope scaling) is not supported")
        if "token_embd.weight" in self._tensors:
            vocab_size = self._tensors["token_embd.weight"].shape[0]
        else:
            vocab_size = key("vocab_size", None) or len(self._meta("tokenizer.ggml.tokens"))
        config = {
            "model_type": self._arch.model_type,
            "architectures": [self._arch.hf_class],
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": key("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": key("context_length"),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id"),
        }
        rope = self._rope(key("rope.freq_base", 10_000.0))
        if self._arch.model_type != "gemma3_text":
            return config | {"rope_parameters": rope}
        layers = config["num_hidden_layers"]
        return config | {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": key("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA)},
                "full_attention": rope,
            },
            "sliding_window": key("attention.sliding_window"),
            "layer_types": self._gemma3_layer_types(layers),
            # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B (hidden / heads)
            "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": key("final_logit_softcapping", None),
            "attn_logit_softcapping": key("attn_logit_softcapping", None),
        }

    def _rope(self, theta: float) -> dict[str, Any]:
        """HF `rope_parameters` for the (global) rotary embedding: default, or linear scaling."""
        scaling = self._meta(f"{self._file_arch}.rope.scaling.type", "none")
        if scaling == "none":
            return {"rope_type": "default", "rope_theta": theta}
        if scaling == "linear":
            return {"rope_type": "linear", "rope_theta": theta,
                    "factor": self._meta(f"{self._file_arch}.rope.scaling.factor")}
        raise CheckpointError(f"{self.path}: rope scaling {scaling!r} ({self._file_arch}.rope.scaling.type) "
                              "is not supported")

    def _gemma3_layer_types(self, layers: int) -> list[str]:
        pattern = self._meta("gemma3.attention.sliding_window_pattern", _GEMMA3_SLIDING_PERIOD)
        if isinstance(pattern, list):  # newer files: one flag per layer, true where attention slides
            if len(pattern) != layers:
                raise CheckpointError(f"{self.path}: gemma3.attention.sliding_window_pattern has {len(pattern)} "
                                      f"entries for {layers} layers")
            sliding = [bool(p) for p in pattern]
        else:  # a period: every `pattern`-th layer is global
            sliding = [pattern > 0 and (i + 1) % pattern != 0 for i in range(layers)]
        return ["sliding_attention" if s else "full_attention" for s in sliding]

    # -- tensor names and shapes ---------------------------------------------------------------------

    def _name_map(self) -> dict[str, str]:
        """HF name -> GGUF name, for every parameter the HF model has, in layer order."""
        names = {"model.embed_tokens.weight": "token_embd.weight"}
        for i in range(self.hf_config["num_hidden_layers"]):
            for gguf_leaf, hf_leaf in self._arch.layer_tensors.items():
                names[f"model.layers.{i}.{hf_leaf}"] = f"blk.{i}.{gguf_leaf}"
        names["model.norm.weight"] = "output_norm.weight"
        if not self.hf_config["tie_word_embeddings"]:
            names["lm_head.weight"] = "output.weight"
        return names

    def _check_tensor_table(self) -> None:
        """Refuse files holding tensors the HF model has no place for (they would be silently dropped)."""
        known = set(self._to_gguf.values())
        unknown = sorted(name for name in self._tensors if name not in known)
        if unknown:
            raise CheckpointError(f"{self.path}: tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''} have no "
                                  f"counterpart in the HF {self._arch.model_type} model")

    def _expected_shape(self, hf_name: str) -> tuple[int, ...]:
        c = self.hf_config
        hidden, d = c["hidden_size"], c["head_dim"]
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        leaf = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else hf_name
        shapes = {
            "model.embed_tokens.weight": (c["vocab_size"], hidden),
            "lm_head.weight": (c["vocab_size"], hidden),
            "self_attn.q_proj.weight": (q, hidden),
            "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden),
            "self_attn.o_proj.weight": (hidden, q),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.q_norm.weight": (d,),
            "self_attn.k_norm.weight": (d,),
            "mlp.gate_proj.weight": (c["intermediate_size"], hidden),
            "mlp.up_proj.weight": (c["intermediate_size"], hidden),
            "mlp.down_proj.weight": (hidden, c["intermediate_size"]),
        }
        return shapes.get(leaf, (hidden,))  # the rest are the hidden-size norms


def _resolve_arch(file_arch: str, model_name: str, path: pathlib.Path) -> _Arch:
    """The HF family of a file. llama.cpp writes Mistral models as `llama`; transformers then reads
    `general.name` to tell them apart, which we do too (case-insensitively)."""
    if file_arch == "llama" and "mistral" in str(model_name).lower():
        return _MISTRAL
    if file_arch not in _ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {file_arch!r} is not supported "
                              f"(supported: {', '.join(sorted(_ARCHS))})")
    return _ARCHS[file_arch]


def _unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head it stored rows as (dim/2, 2) where HF has (2, dim/2)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- GGUF header parser ------------------------------------------------------------------------------


def _read_header(buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, _TensorInfo]]:
    """The metadata key/values and the tensor table of a (little-endian, v2/v3) GGUF file."""
    if buf[:4] != _GGUF_MAGIC:
        raise ValueError("no GGUF magic bytes")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"GGUF version {version} (supported: {_GGUF_VERSIONS})")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, value_type)
    entries = []
    for _ in range(tensor_count):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(qtype), offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in entries:
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * block_bytes
        if data_start + offset + nbytes > len(buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = _TensorInfo(name, shape, qtype, data_start + offset, nbytes)
    return metadata, tensors


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    return buf[pos + 8:end].decode("utf-8"), end


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type in _SCALAR_FORMATS:
        fmt = "<" + _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type != _ARRAY:
        raise ValueError(f"metadata value type {value_type} at byte {pos}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in _SCALAR_FORMATS:
        dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
        values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
        return values, pos + count * dtype.itemsize
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, item_type)
        values.append(value)
    return values, pos
