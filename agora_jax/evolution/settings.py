"""The run's settings, typed: built once from the ConfigDict at the top (`settings_of`, in `evolve`) and
handed down a section at a time, so each layer gets only what it reads (`build_pool` the pool, the
distillation and the engine's shapes; `distillation_data` the distillation; the evaluation its decoding).

This is where each setting of these sections is documented (its default is `config.base_config`'s, the
variants' changes are `config.VARIANT_SETTINGS`). Two sections keep their ConfigDict: `task.*`, the
task's own spec (`config.make_task`), and `strategy.*`, each strategy module's `defaults()`.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """`pool.*`: the models a run starts from (`pool_builder.build_pool`)."""

    # "scratch": tiny models trained here on the synthetic task (no downloads); "pretrained": `models` are
    # loaded (`agora_jax.models.load`)
    kind: str
    models: tuple[str, ...]  # names (scratch) or what `agora_jax.models.load` accepts
    dtype: str  # parameter dtype
    compute_dtype: str  # activation dtype
    # scratch pool: each member a `preset` model trained on its own slice of the synthetic train split
    preset: str
    pretrain_steps: int  # members fit their own slice but are not done learning the shared second step
    pretrain_batch: int  # more, smaller updates in the same time on CPU: better members (see README)
    pretrain_learning_rate: float
    # the pretraining check: a member whose greedy answers get less than this share of its own training
    # problems right did not learn them (0.17-0.50 where members failed at lr 3e-3; >= 0.85 otherwise)
    # and trains further from where it stopped, at most `pretrain_attempts` attempts in all. 0 = no
    # check (the base default; configs/debate.py's default pool checks at 0.8, on a task whose pair
    # problems leave its collaboration room to improve: docs/experiments.md, session 13)
    pretrain_check: float
    pretrain_attempts: int
    slicing: str  # expert: own group of questions + a share of the rest; random: different slices
    pretrain_fraction: float  # expert: share of the other groups; random: share of the train split
    # scratch pool: every member starts from one initialisation (seeded by `seed`, saved in workdir/pool/base/),
    # the common base whose task vectors weight merging (dare_ties) combines; False: each its own seed
    shared_init: bool


@dataclasses.dataclass(frozen=True)
class LogitSettings:
    """`distill.logit.*`: logit KD's sequences."""

    # collaboration (the examples, teacher-forced) | pool (sampled from the teacher) | student (the
    # student's own samples)
    source: str
    temperature: float  # of those samples


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """`distill.*`: how collaborative outputs are distilled into every member (`distillation.py`; scratch
    pretraining trains with these too, its own learning rate, batch size and steps)."""

    # supervised: everyone trains on the collaboration's outputs; multi_student: + half of one's own and half
    # of the best member's dev outputs; logit: KD toward the collaboration's next-token distribution (the
    # fused pool, or the one model that produced an example) on the collaboration's examples
    method: str
    logit: LogitSettings
    epochs: int
    learning_rate: float
    batch_size: int
    warmup_ratio: float  # share of the steps warming up
    lora_rank: int  # 0 = full fine-tuning; paper reference: LoRA r=64, alpha=16, dropout 0.1
    lora_alpha: float
    lora_dropout: float
    filter: str  # none (reference code) | answered | agreement | correct_on_dev (oracle ablation)
    # scratch pools, supervised and multi_student: add replay x (number of distillation examples) of each
    # member's own training examples to its distillation data (rehearsal: it keeps what it knew);
    # 0 = the paper's recipe
    replay: float
    min_agreement: float  # filter="agreement": share of the last round's answers that must agree
    max_len: int
    # padded lengths of training batches (empty: powers of two up to max_len); 48 holds every example of
    # the default synthetic task (prompt 25 + answer <= 16 tokens)
    buckets: tuple[int, ...]
    remat: bool  # recompute layer blocks in the backward pass (saves memory on big models)
    # supervised and multi_student: members of one architecture train at once, stacked in one compiled
    # step, each on its own data, epochs and schedule (as alone, to float rounding); False: one after
    # another (one member's training state in memory at a time; hub pools)
    stack_students: bool


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """`evaluation.*`: how single models are evaluated on test."""

    temperature: float  # 0: greedy
    # also the collaboration's answer length: `strategy.sampling.max_new_tokens` is a reference to it
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """`engine.*`: the sampling engine's batch shapes."""

    # rows per member of one compiled sampling call (prompt x sample; a round's rows are cut into calls of
    # this size, rounded up to a power of two): the prefill's activation memory grows with it
    max_batch: int


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """`mesh.*`: the device mesh (-1: all remaining devices); the product must divide the device count."""

    data: int
    fsdp: int
    tensor: int


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """`checkpoint.*`: retention."""

    max_to_keep: int | None  # generation checkpoints kept (None: all)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The whole run but its task and strategy (which keep their ConfigDict sections)."""

    variant: str  # `config.VARIANTS`
    seed: int  # the run's seed; every unit draws from (seed, round, unit)
    rounds: int  # R, the evolution rounds after round 0 (paper default R = 3)
    pool: PoolSettings
    evaluation: EvalSettings
    distill: DistillSettings
    engine: EngineSettings
    mesh: MeshSettings
    checkpoint: CheckpointSettings


def settings_of(config: ml_collections.ConfigDict) -> RunSettings:
    """The typed settings of a (validated) config: its values as they are, tuples as tuples."""
    pool, distill = config.pool, config.distill
    return RunSettings(
        variant=config.variant, seed=config.seed, rounds=config.rounds,
        pool=PoolSettings(
            kind=pool.kind, models=tuple(pool.models), dtype=pool.dtype, compute_dtype=pool.compute_dtype,
            preset=pool.preset, pretrain_steps=pool.pretrain_steps, pretrain_batch=pool.pretrain_batch,
            pretrain_learning_rate=pool.pretrain_learning_rate, pretrain_check=pool.pretrain_check,
            pretrain_attempts=pool.pretrain_attempts, slicing=pool.slicing,
            pretrain_fraction=pool.pretrain_fraction, shared_init=pool.shared_init),
        evaluation=EvalSettings(temperature=config.evaluation.temperature,
                                max_new_tokens=config.evaluation.max_new_tokens),
        distill=DistillSettings(
            method=distill.method,
            logit=LogitSettings(source=distill.logit.source, temperature=distill.logit.temperature),
            epochs=distill.epochs, learning_rate=distill.learning_rate, batch_size=distill.batch_size,
            warmup_ratio=distill.warmup_ratio, lora_rank=distill.lora_rank, lora_alpha=distill.lora_alpha,
            lora_dropout=distill.lora_dropout, filter=distill.filter, replay=distill.replay,
            min_agreement=distill.min_agreement, max_len=distill.max_len, buckets=tuple(distill.buckets),
            remat=distill.remat, stack_students=distill.stack_students),
        engine=EngineSettings(max_batch=config.engine.max_batch),
        mesh=MeshSettings(data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor),
        checkpoint=CheckpointSettings(max_to_keep=config.checkpoint.max_to_keep),
    )
