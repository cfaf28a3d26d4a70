"""Pools: same-architecture models stacked into one vmapped program, and logit fusion.

    pool = PoolEngine([model_a, model_b, model_c], [tok_a, tok_b, tok_c])
    outs = pool.generate([prompts_a, prompts_b, prompts_c], params)  # outs[model][prompt][sample]
    fused = pool.fused_generate(prompts, params, weights=[0.5, 0.25, 0.25])  # fused[prompt][sample]

Members with the same `ModelConfig` form one group whose parameters are stacked on a leading model
axis and decoded by one compiled program (each member with its own prompts); other groups run their
own programs in the same call. Logit fusion decodes one sequence per prompt from the weighted
average of every member's next-token logits (or probabilities), all groups inside one decode loop,
each member with its own KV cache. Weights are snapshotted when the engine is built: call
`refresh()` after updating the models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agora_jax.models import Tokenizer, Transformer
from agora_jax.models.sharding import place, stack
from agora_jax.sampling.engine import Runner
from agora_jax.sampling.params import Completion, Prompt, SamplingParams
from agora_jax.sampling.sampler import FusionMode, fused_decoder, model_axis, single_decoder, stacked_decoder


def stack_states(models: Sequence[Transformer], mesh: Mesh | None = None) -> nnx.State:
    """The models' parameters stacked on a new model axis (`model_axis`: after the layer axis of
    layer-stacked parameters); on `mesh` that axis is replicated, the others keep the first model's
    sharding."""

    def stack_variable(*variables: nnx.Variable) -> nnx.Variable:
        axis = model_axis(variables[0])
        values = [v.get_value() for v in variables]  # arrays, or abstract ones (ahead-of-time compilation)
        value = stack(values, axis)
        if mesh is not None:
            spec = list(values[0].sharding.spec)
            spec += [None] * (value.ndim - 1 - len(spec))
            value = place(value, NamedSharding(mesh, PartitionSpec(*spec[:axis], None, *spec[axis:])))
        return variables[0].replace(value)

    return jax.tree.map(stack_variable, *[nnx.state(m) for m in models], is_leaf=lambda x: isinstance(x, nnx.Variable))


class PoolEngine:
    """Generation for a pool of models: stacked groups per architecture, and logit fusion."""

    def __init__(self, models: Sequence[Transformer], tokenizers: Sequence[Tokenizer], *, mesh: Mesh | None = None,
                 max_batch: int = 256, min_prompt_len: int = 16):
        if len(models) != len(tokenizers) or not models:
            raise ValueError(f"{len(models)} models and {len(tokenizers)} tokenizers: need one tokenizer per model")
        self.models = list(models)
        self.tokenizers = list(tokenizers)
        self._options = dict(mesh=mesh, max_batch=max_batch, min_prompt_len=min_prompt_len)
        groups: dict[Any, list[int]] = {}
        for i, model in enumerate(self.models):
            groups.setdefault(model.config, []).append(i)
        self.groups: list[list[int]] = list(groups.values())
        self._runners: list[Runner] = []
        self._fused: dict[FusionMode, Runner] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read (re-stack) the members' weights; compiled programs are kept."""
        old = self._runners
        self._runners = []
        for k, group in enumerate(self.groups):
            model = self.models[group[0]]
            members = [self.models[i] for i in group]
            params = nnx.state(model) if len(group) == 1 else stack_states(members, self._options["mesh"])
            if old:
                old[k].params = params
                self._runners.append(old[k])
                continue
            decoder = single_decoder(model) if len(group) == 1 else stacked_decoder(model, len(group))
            self._runners.append(Runner(decoder, params, [self.tokenizers[i] for i in group],
                                        model.config.vocab_size, **self._options))
        for runner in self._fused.values():
            runner.params = dict(runner.params, members=self._member_params())

    @property
    def num_compilations(self) -> int:
        return sum(r.programs.num_compilations for r in (*self._runners, *self._fused.values()))

    @property
    def compile_seconds(self) -> float:
        return sum(r.programs.compile_seconds for r in (*self._runners, *self._fused.values()))

    def generate(self, prompts_per_model: Sequence[Sequence[Prompt]],
                 params: SamplingParams = SamplingParams()) -> list[list[list[Completion]]]:
        """Each model's completions for its own prompts: `out[model][prompt][sample]`."""
        if len(prompts_per_model) != len(self.models):
            raise ValueError(f"prompts for {len(prompts_per_model)} models; the pool has {len(self.models)}")
        # Seeds number the call's prompts member-major over the whole pool, not per stacked group.
        seeds = params.member_seeds([len(p) for p in prompts_per_model])
        out: list[list[list[Completion]]] = [[] for _ in self.models]
        for group, runner in zip(self.groups, self._runners):
            group_params = dataclasses.replace(params, seed=tuple(s for i in group for s in seeds[i]))
            for i, completions in zip(group, runner.run([prompts_per_model[i] for i in group], group_params)):
                out[i] = completions
        return out

    def fused_generate(self, prompts: Sequence[Prompt], params: SamplingParams = SamplingParams(),
                       weights: Sequence[float] | None = None, mode: FusionMode = "logits") -> list[list[Completion]]:
        """Completions decoded from the weighted average (`weights`, default uniform, normalised) of all
        members' next-token logits (`mode="logits"`) or probabilities (`mode="probs"`)."""
        weights = np.ones(len(self.models)) if weights is None else np.asarray(weights, np.float64)
        if weights.shape != (len(self.models),) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"need {len(self.models)} non-negative fusion weights, got {weights.tolist()}")
        if mode not in ("logits", "probs"):
            raise ValueError(f"mode must be 'logits' or 'probs', got {mode!r}")
        if mode not in self._fused:
            self._check_shared_vocabulary()
            decoder = fused_decoder([(self.models[g[0]], len(g)) for g in self.groups], mode)
            self._fused[mode] = Runner(decoder, {"members": self._member_params()}, self.tokenizers[:1],
                                       self.models[0].config.vocab_size, **self._options)
        runner = self._fused[mode]
        order = [i for group in self.groups for i in group]  # the members' order inside the program
        runner.params = dict(runner.params, weights=jnp.asarray(weights[order] / weights.sum(), jnp.float32))
        return runner.run([prompts], params)[0]

    def _member_params(self) -> tuple:
        """Every group's stacked params (a singleton group is stacked alone, a copy of its weights)."""
        return tuple(r.params if len(g) > 1 else stack_states([self.models[g[0]]], self._options["mesh"])
                     for g, r in zip(self.groups, self._runners))

    def _check_shared_vocabulary(self) -> None:
        vocab_sizes = {m.config.vocab_size for m in self.models}
        vocab = self.tokenizers[0].hf.get_vocab()
        if len(vocab_sizes) > 1 or any(t.hf.get_vocab() != vocab for t in self.tokenizers[1:]):
            raise ValueError("logit fusion needs members that share one vocabulary (same tokenizer and vocab size)")
