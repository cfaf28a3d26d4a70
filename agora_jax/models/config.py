"""`ModelConfig`: one decoder-only transformer description, read from a Hugging Face `config.json`.

The families differ only in a handful of switches (biases, q/k norms, norm offsets, sandwich norms,
sliding windows, rope bases); `ModelConfig.from_hf` maps each family's config onto them, and
`to_hf` writes the dict back for export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from agora_jax.models.errors import UnsupportedModelError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_MODEL_TYPE_ALIASES = {"gemma3": "gemma3_text"}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type (`default`, `linear` or `llama3` scaling)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: dict[str, Any]) -> RopeConfig:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type={rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})"
            )
        fields = {f.name for f in dataclasses.fields(cls)} - {"theta", "rope_type"}
        return cls(
            theta=float(params["rope_theta"]),
            rope_type=rope_type,
            **{k: params[k] for k in fields if params.get(k) is not None},
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "linear":
            out["factor"] = self.factor
        elif self.rope_type == "llama3":
            out.update(
                factor=self.factor,
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs; hashable so it can be a static jit argument."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    local_rope: RopeConfig | None = None  # rope of sliding-window layers when it differs (gemma3)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window?
    rms_norm_eps: float = 1e-6
    activation: str = "silu"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0  # gemma RMSNorm multiplies by (offset + w)
    sandwich_norms: bool = False  # gemma3 post-attention and post-feed-forward norms
    embed_scale: float = 1.0
    query_pre_attn_scalar: float | None = None  # gemma: scores scaled by its -1/2 power, else head_dim's
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype

    def __post_init__(self):
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (self.sliding_window is not None,) * self.num_layers)
        if len(self.sliding_layers) != self.num_layers:
            raise UnsupportedModelError(
                f"layer_types has {len(self.sliding_layers)} entries for {self.num_layers} layers"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, param_dtype: str = "float32", dtype: str | None = None) -> ModelConfig:
        """Build from a Hugging Face config dict (transformers 4 `rope_theta` or 5 `rope_parameters` style)."""
        model_type = _MODEL_TYPE_ALIASES.get(hf.get("model_type", ""), hf.get("model_type", ""))
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"model_type={hf.get('model_type')!r} (architectures={hf.get('architectures')}) is not supported; "
                f"supported families: {', '.join(FAMILIES)}"
            )
        if "text_config" in hf and "hidden_size" not in hf:
            raise UnsupportedModelError("multimodal configs: pass the text_config of the checkpoint")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise UnsupportedModelError(f"config of model_type={model_type!r} lacks {', '.join(missing)}")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
        num_layers = hf["num_hidden_layers"]
        heads = hf["num_attention_heads"]
        gemma = model_type == "gemma3_text"
        rope, local_rope = _rope_from_hf(hf, gemma)
        sliding_window, sliding_layers = _sliding_from_hf(hf, model_type, num_layers)
        eos = hf.get("eos_token_id")
        return cls(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope=rope,
            local_rope=local_rope,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            activation=_ACTIVATIONS[act],
            tie_embeddings=hf.get("tie_word_embeddings", gemma),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            embed_scale=math.sqrt(hf["hidden_size"]) if gemma else 1.0,
            query_pre_attn_scalar=hf["query_pre_attn_scalar"] if gemma else None,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            param_dtype=param_dtype,
            dtype=dtype or param_dtype,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config dict that `transformers` loads back into the same model."""
        layer_types = ["sliding_attention" if s else "full_attention" for s in self.sliding_layers]
        out: dict[str, Any] = {
            "model_type": self.family,
            "architectures": [_ARCHITECTURES[self.family]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }
        if self.family == "gemma3_text":
            out.update(
                hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                sliding_window=self.sliding_window,
                layer_types=layer_types,
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                rope_parameters={
                    "full_attention": self.rope.to_hf(),
                    "sliding_attention": (self.local_rope or self.rope).to_hf(),
                },
            )
            return out
        out.update(hidden_act=self.activation if self.activation == "silu" else "gelu_pytorch_tanh",
                   rope_parameters=self.rope.to_hf())
        if self.family in ("llama", "qwen3"):
            out["attention_bias"] = self.qkv_bias
        if self.family == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.family == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            out.update(use_sliding_window=any(self.sliding_layers), sliding_window=self.sliding_window,
                       layer_types=layer_types, max_window_layers=self.num_layers)
        return out


def _rope_from_hf(hf: dict[str, Any], gemma: bool) -> tuple[RopeConfig, RopeConfig | None]:
    params = hf.get("rope_parameters")
    if params is None:  # transformers 4 style
        legacy = dict(hf.get("rope_scaling") or {})
        legacy["rope_theta"] = hf.get("rope_theta", 10000.0)
        params = legacy
        if gemma:
            local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
            params = {"full_attention": legacy, "sliding_attention": local}
    if gemma:
        return RopeConfig.from_hf(params["full_attention"]), RopeConfig.from_hf(params["sliding_attention"])
    return RopeConfig.from_hf(params), None


def _sliding_from_hf(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return window, (window is not None,) * num_layers
    if model_type == "llama":
        return None, (False,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if model_type == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(num_layers)]
        else:  # qwen2/qwen3 before `layer_types`: sliding on layers >= max_window_layers
            use = hf.get("use_sliding_window", False)
            first = hf.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(num_layers)]
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    if any(sliding) and window is None:
        raise UnsupportedModelError("layer_types has sliding_attention layers but sliding_window is null")
    return (window if any(sliding) else None), sliding
