"""The programs a run executes, built from its config on abstract models for a mesh of devices.

`run_programs(config, mesh, buckets)` lists what `launch/main.py` with `config` compiles:

- `generate/...`: the sampling engine's prefill and decode loop for every architecture group of the
  pool (`PoolEngine`: members of one architecture stacked into one vmapped program, a lone member
  single), the single-model engine of a round that asks one member, and the fused decoder of logit
  fusion (`strategy.name == "logit_fusion"`);
- `score/...`: the log-likelihood scorer of `Pool.score_batch` (judges, verifiers, rankers);
- `distill/...`: `distill.*`'s step: the one-student train step (supervised, multi_student; full
  or LoRA, remat as configured), or for logit KD the stacked-students KD step (`logit.source =
  collaboration`) or the on-policy sample-and-distil step.

Every program is the project's own function (`sampling.engine.Programs`, `Trainer.compile`, the
scorer), lowered with abstract arguments that carry the shardings the run gives them; programs whose
models differ only in constants (rope base, special tokens) are compiled once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agora_jax.distill.onpolicy import OnPolicyTrainer, SamplingConfig, onpolicy_step
from agora_jax.distill.stacked import StackedTrainer, teacher_pool
from agora_jax.distill.trainer import Teacher, Trainer
from agora_jax.evolution.config import ConfigError
from agora_jax.evolution.distillation import trainer_config
from agora_jax.evolution.settings import DistillSettings, PoolSettings, settings_of
from agora_jax.models import ModelConfig, RopeConfig, Transformer, preset, tiny_tokenizer
from agora_jax.models.shapes import abstract_model, architecture
from agora_jax.models.sharding import place, state_shardings
from agora_jax.sampling import engine, sampler, stack_states
from agora_jax.pool.scoring import _read_logprobs

S = jax.ShapeDtypeStruct
SCORE_BATCH_TOKENS, SCORE_LOGITS = 8192, 2**24  # `completion_logprobs`' batch limits
STEPS = 1000  # schedule length of the compiled train steps (static: any value gives the same shapes)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The engine shapes to compile for: rows per member of one call (the engine's `max_batch`), the
    longest prompt bucket and the generation budget (both powers of two, as the engine pads them)."""

    rows: int
    prompt_len: int
    max_new: int


@dataclasses.dataclass
class Program:
    """One compiled program of the run. `compile()` lowers and compiles it (`lower()`, where given,
    only lowers: the cheap check that its arguments fit the function); `floor(n)` is the least
    per-device memory it can need on `n` devices, from shapes alone (before compiling);
    `model_flops` is the useful work of one call (decode: of one token step), all devices together."""

    name: str
    kind: str  # prefill | decode | score | train | onpolicy
    models: tuple[str, ...]
    compile: Callable[[], jax.stages.Compiled]
    floor: Callable[[int], int]
    model_flops: float
    tokens: int  # tokens one call (decode: one step) generates or trains on
    steps: int = 1  # decode: token steps of one call
    lower: Callable[[], jax.stages.Lowered] | None = None


def _bytes_per_device(tree: Any, devices: int) -> int:
    """Bytes of `tree` on one device: a leaf's shard if it carries a sharding, else its share of `devices`."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        size = math.prod(shape) * x.dtype.itemsize
        total += size if sharding is not None else -(-size // devices)
    return total


def _floor(*trees: Callable[[], Any]) -> Callable[[int], int]:
    return lambda devices: sum(_bytes_per_device(tree(), devices) for tree in trees)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights a token passes through: the layers' projections and the LM head."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (2 * d * q + 2 * d * kv + 3 * d * f) + d * cfg.vocab_size


def forward_flops(cfg: ModelConfig, tokens: int, context: float) -> float:
    """Forward FLOPs of `tokens` tokens, each attending to `context` keys (2 per multiply-add)."""
    return tokens * (2 * matmul_params(cfg) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context)


def _shape_key(cfg: ModelConfig) -> ModelConfig:
    """What a compiled program depends on: `cfg` without constants (rope base, context, token ids)."""
    return cfg.replace(rope=RopeConfig(1.0), local_rope=None, max_position_embeddings=0, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)


def _sharded_params(cfg: ModelConfig, mesh: Mesh) -> tuple[Transformer, nnx.State]:
    """An abstract model of `cfg` and its parameters with the shardings `load(..., mesh=mesh)` gives them."""
    model = abstract_model(cfg)
    state = nnx.state(model)
    return model, place(state, state_shardings(state, mesh))


def _replicated(mesh: Mesh, shape: tuple[int, ...], dtype: Any) -> S:
    return S(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _knobs(mesh: Mesh, lead: tuple[int, ...], vocab: int) -> sampler.Knobs:
    scalar = functools.partial(_replicated, mesh, ())
    return sampler.Knobs(temperature=scalar(jnp.float32), top_k=scalar(jnp.int32), top_p=scalar(jnp.float32),
                         min_p=scalar(jnp.float32), is_stop=_replicated(mesh, (*lead, vocab), jnp.bool_),
                         max_new=scalar(jnp.int32))


def generate(name: str, models: tuple[str, ...], decoder: sampler.Decoder, params: Any, mesh: Mesh,
             architectures: Sequence[ModelConfig], buckets: Buckets, rows_out: int) -> list[Program]:
    """The engine's prefill and decode programs of `decoder` for `buckets`, rows sampled (the
    strategies' setting; greedy evaluation has the same shapes without the top-p filter).
    `architectures`: the model each row passes through, one per member; `rows_out`: rows generated."""
    programs = engine.Programs(decoder)
    lead = decoder.lead

    def rows(dtype: Any, *trailing: int) -> S:  # `Runner._place`: the batch axis over (data, fsdp)
        spec = PartitionSpec(*([None] * len(lead)), engine.BATCH_AXES, *([None] * len(trailing)))
        return S((*lead, buckets.rows, *trailing), dtype, sharding=NamedSharding(mesh, spec))

    args = (params, rows(jnp.int32, buckets.prompt_len), rows(jnp.bool_, buckets.prompt_len), rows(jnp.uint32),
            rows(jnp.int32), _knobs(mesh, lead, architectures[0].vocab_size))
    statics = dict(max_new=buckets.max_new, greedy=False)
    state = functools.partial(jax.eval_shape, functools.partial(sampler.prefill, decoder, **statics), *args)

    def decode() -> jax.stages.Compiled:
        prefill = programs.compiled("prefill", args, **statics)
        carried = jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), prefill.out_info,
                               prefill.output_shardings)
        return programs.compiled("decode", (params, carried, args[-1]), prompt_len=buckets.prompt_len, greedy=False)

    def flops(tokens: int, context: float) -> float:
        return sum(forward_flops(cfg, tokens, context) for cfg in architectures)

    floor = _floor(lambda: args, state)
    prompt_tokens = buckets.rows * buckets.prompt_len
    return [
        Program(f"{name}/prefill", "prefill", models, lambda: programs.compiled("prefill", args, **statics), floor,
                flops(prompt_tokens, buckets.prompt_len / 2), prompt_tokens * len(architectures)),
        Program(f"{name}/decode", "decode", models, decode, floor,
                flops(buckets.rows, buckets.prompt_len + buckets.max_new / 2), rows_out, steps=buckets.max_new),
    ]


def _engine(name: str, models: tuple[str, ...], cfg: ModelConfig, size: int, mesh: Mesh,
            buckets: Buckets) -> list[Program]:
    """The programs of a `PoolEngine` group of `size` members of `cfg` (one: the single-model engine)."""
    model, params = _sharded_params(cfg, mesh)
    if size == 1:
        return generate(name, models, sampler.single_decoder(model), params, mesh, [cfg], buckets, buckets.rows)
    return generate(name, models, sampler.stacked_decoder(model, size), _stacked_params(model, params, size, mesh),
                    mesh, [cfg] * size, buckets, size * buckets.rows)


def _stacked_params(model: Transformer, params: nnx.State, size: int, mesh: Mesh) -> nnx.State:
    """`PoolEngine`'s stacked parameters of `size` members (`stack_states`)."""
    return stack_states([nnx.merge(nnx.graphdef(model), params)] * size, mesh)


def score(name: str, models: tuple[str, ...], cfg: ModelConfig, mesh: Mesh, buckets: Buckets) -> Program:
    """`completion_logprobs`' program for a prompt of the longest bucket and a completion of the budget."""
    model, params = _sharded_params(cfg, mesh)
    length, width = engine.bucket(buckets.prompt_len + buckets.max_new, 16), buckets.max_new
    batch = engine.bucket(min(SCORE_BATCH_TOKENS // length, SCORE_LOGITS // (width * cfg.vocab_size)))
    ids, reads = _replicated(mesh, (batch, length), jnp.int32), _replicated(mesh, (batch, width), jnp.int32)
    args = (params, ids, _replicated(mesh, (batch, length), jnp.bool_), reads, reads)
    lower = functools.partial(_read_logprobs.lower, nnx.graphdef(model), *args)
    return Program(name, "score", models, lambda: lower().compile(), _floor(lambda: args),
                   forward_flops(cfg, batch * length, length / 2), batch * width, lower=lower)


def _batch(trainer: Trainer, lead: tuple[int, ...], rows: int, length: int, teachers: int = 0) -> dict[str, S]:
    """A training batch (`collate`; `kd_batch` adds each row's teacher weights) with `Trainer.batch_sharding`."""
    shapes = {"input_ids": jnp.int32, "attention_mask": jnp.bool_, "targets": jnp.int32, "loss_weights": jnp.float32}
    batch = {k: S((*lead, rows, length), dtype) for k, dtype in shapes.items()}
    if teachers:
        batch["teacher_weights"] = S((*lead, rows, teachers), jnp.float32)
    return {k: S(x.shape, x.dtype, sharding=trainer.batch_sharding(x.shape)) for k, x in batch.items()}


def _teacher(models: Sequence[Transformer], mesh: Mesh) -> Teacher:
    """`teacher_pool(models)` on the mesh: each member's parameters as loaded, the pool axis replicated."""
    pool = teacher_pool(models)
    single = nnx.to_pure_dict(state_shardings(nnx.state(models[0]), mesh))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(None, *s.spec)), single)
    return Teacher(pool.graphdef, place(pool.params, shardings))


def _train_flops(cfg: ModelConfig, tokens: int, length: int, lora: bool, teachers: int) -> float:
    """Model FLOPs of a train step: forward and backward (x3; LoRA x2: no weight gradients of the frozen
    base) plus a forward of every KD teacher; remat's recomputation is not useful work."""
    forward = forward_flops(cfg, tokens, length / 2)
    return forward * ((2 if lora else 3) + teachers)


def distill(name: str, models: tuple[str, ...], cfg: ModelConfig, settings: DistillSettings, seed: int,
            max_new_tokens: int, mesh: Mesh, buckets: Buckets, students: int) -> Program:
    """The step of `settings` for `students` students of architecture `cfg` (one: the supervised
    `Trainer`; more: logit KD's stacked or on-policy trainer, the members themselves the teachers, its
    samples up to `max_new_tokens` long) in a run of `seed`."""
    dcfg = trainer_config(settings, seed)
    rows, length = dcfg.data.batch_size, max(dcfg.data.bucket_lengths())
    student = [abstract_model(cfg) for _ in range(students)]
    lora = dcfg.lora is not None

    def horizon(trainer: Trainer) -> S:  # the steps' schedule lengths
        return _replicated(mesh, trainer.horizon.shape, jnp.int32)

    if students == 1:
        trainer = Trainer(student[0], dcfg, STEPS, mesh=mesh)
        batch = _batch(trainer, (), rows, length)
        args = (trainer.state, trainer.frozen, batch, None, horizon(trainer))
        flops, kind = _train_flops(cfg, rows * length, length, lora, 0), "train"
        step = trainer.compile(trainer.step_function)
    elif settings.logit.source == "collaboration":
        trainer = StackedTrainer(student, dcfg.replace(objective="kd"), STEPS, mesh=mesh,
                                 teacher=_teacher(student, mesh))
        batch = _batch(trainer, (students,), rows, length, teachers=students)
        args = (trainer.state, trainer.frozen, batch, trainer.teacher, horizon(trainer))
        flops, kind = students * _train_flops(cfg, rows * length, length, lora, students), "train"
        step = trainer.compile(trainer.step_function)
    else:
        sampling = SamplingConfig(num_new=max_new_tokens, source=settings.logit.source,
                                  temperature=settings.logit.temperature)
        trainer = OnPolicyTrainer(student, dcfg, STEPS, mesh=mesh, teacher=_teacher(student, mesh), sampling=sampling)
        length = buckets.prompt_len + sampling.num_new
        prompts = functools.partial(_replicated, mesh, (students, rows, buckets.prompt_len))
        key = jax.eval_shape(lambda: jax.random.key(0))
        args = (trainer.state, trainer.frozen, trainer.teacher, prompts(jnp.int32), prompts(jnp.bool_),
                _replicated(mesh, (students, rows, students), jnp.float32),
                _replicated(mesh, (students, rows), jnp.float32), _replicated(mesh, (), key.dtype), horizon(trainer))
        flops, kind = students * _train_flops(cfg, rows * length, length, lora, students), "onpolicy"
        step = trainer.compile(onpolicy_step, sampling=sampling)
    lower = functools.partial(step.lower, *args)
    return Program(name, kind, models, lambda: lower().compile(), _floor(lambda: args), flops, students * rows * length,
                   lower=lower)


def member_configs(settings: PoolSettings) -> list[tuple[str, ModelConfig]]:
    """(name, architecture) of every pool member, as `build_pool` would load or create it."""
    if settings.kind == "scratch":
        vocab = tiny_tokenizer().vocab_size
        cfg = preset(settings.preset, vocab_size=vocab + (-vocab % 8))
        return [(str(name), cfg) for name in settings.models]
    return [(str(m).rstrip("/").split("/")[-1], architecture(m, settings.dtype, settings.compute_dtype))
            for m in settings.models]


def run_programs(config: ml_collections.ConfigDict, mesh: Mesh, buckets: Buckets) -> list[Program]:
    """Every program of a run of `config` (see the module docstring), each shape once; a role that
    runs on several shapes (a pool of two architectures) numbers them `role:1`, `role:2`."""
    run = settings_of(config)
    groups: dict[ModelConfig, list[str]] = {}
    for name, cfg in member_configs(run.pool):
        groups.setdefault(cfg, []).append(name)
    specs: dict[tuple[str, Any], tuple[list[str], Callable[[str, tuple[str, ...]], list[Program]]]] = {}

    def add(role: str, key: Any, names: Sequence[str], build: Callable[..., Any]) -> None:
        known, _ = specs.setdefault((role, key), ([], build))
        known.extend(n for n in names if n not in known)

    logit = run.distill.method == "logit"
    step = functools.partial(distill, settings=run.distill, seed=run.seed,
                             max_new_tokens=run.evaluation.max_new_tokens, mesh=mesh, buckets=buckets)
    for cfg, names in groups.items():
        key = _shape_key(cfg)
        add("generate/single", key, names, functools.partial(_engine, cfg=cfg, size=1, mesh=mesh, buckets=buckets))
        if len(names) > 1:
            add(f"generate/stacked{len(names)}", key, names,
                functools.partial(_engine, cfg=cfg, size=len(names), mesh=mesh, buckets=buckets))
        add("score", key, names, lambda n, m, cfg=cfg: [score(n, m, cfg, mesh, buckets)])
        if not logit:
            add("distill/train", key, names, lambda n, m, cfg=cfg: [step(n, m, cfg, students=1)])
    if config.strategy.name == "logit_fusion":
        add("generate/fused", None, [n for names in groups.values() for n in names],
            lambda n, m: _fused(n, m, groups, mesh, buckets))
    if logit:
        if len(groups) > 1:
            raise ConfigError("config.distill.method='logit' needs pool members of one architecture")
        (cfg, names), = groups.items()
        role = "distill/stacked" if run.distill.logit.source == "collaboration" else "distill/onpolicy"
        add(f"{role}{len(names)}", None, names, lambda n, m: [step(n, m, cfg, students=len(m))])
    roles = collections.Counter(role for role, _ in specs)
    seen: collections.Counter = collections.Counter()
    programs = []
    for (role, _), (names, build) in specs.items():
        seen[role] += 1
        programs += build(role if roles[role] == 1 else f"{role}:{seen[role]}", tuple(names))
    return programs


def _fused(name: str, models: tuple[str, ...], groups: dict[ModelConfig, list[str]], mesh: Mesh,
           buckets: Buckets) -> list[Program]:
    """`PoolEngine.fused_generate`'s programs: every group stacked (a lone member too), one row per prompt."""
    members, params, architectures = [], [], []
    for cfg, names in groups.items():
        model, single = _sharded_params(cfg, mesh)
        members.append((model, len(names)))
        params.append(_stacked_params(model, single, len(names), mesh))
        architectures += [cfg] * len(names)
    fused = {"members": tuple(params), "weights": _replicated(mesh, (len(architectures),), jnp.float32)}
    return generate(name, models, sampler.fused_decoder(members, "logits"), fused, mesh, architectures, buckets,
                    buckets.rows)


def fits_in(programs: Sequence[Program], devices: int, hbm_bytes: int) -> list[tuple[Program, int]]:
    """(program, shortfall in bytes) of every program whose shape-only floor exceeds `hbm_bytes`."""
    return [(p, p.floor(devices) - hbm_bytes) for p in programs if p.floor(devices) > hbm_bytes]


__all__ = ["Buckets", "Program", "fits_in", "forward_flops", "matmul_params", "member_configs", "run_programs"]
