"""The pool a run starts from.

`build_pool` gets the pool's settings (`settings.PoolSettings`) and what building it needs of the
others'; `pool.<key>` below is `PoolSettings.<key>`.

- `pool.kind = "pretrained"`: each entry of `pool.models` goes through `agora_jax.models.load`
  (registry name, HF directory, .gguf, hub id); every member is its own copy of the weights, since
  each is distilled separately.
- `pool.kind = "scratch"` (the default, no downloads): each member is a `pool.preset` model trained
  here on its own slice of the task's train split with its own seed, so members differ in what they
  know. Trained members are cached in `workdir/pool/<name>/` as HF directories. With
  `pool.shared_init` every member starts from one initialisation (seeded by the run's seed, saved in
  `workdir/pool/base/`) instead of its own.

`Pool.base` records the members' common base when they have one (the shared initialisation, or the
one checkpoint of a pretrained pool of copies): weight merging takes task vectors relative to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import ml_collections
import numpy as np

from agora_jax.atomic import atomic_path
from agora_jax.evolution.config import ConfigError
from agora_jax.evolution.distillation import distill_member, distill_members
from agora_jax.evolution.settings import DistillSettings, EngineSettings, EvalSettings, MeshSettings, PoolSettings
from agora_jax.models import Tokenizer, Transformer, create, load, make_mesh, preset, save_hf, tiny_tokenizer
from agora_jax.strategies import DistillExample
from agora_jax.strategies.dare_ties import task_vector_base
from agora_jax.pool import Member, Pool, load_params_into
from agora_jax.sampling import SamplingParams
from agora_jax.tasks import Example, Task, evaluate

log = logging.getLogger(__name__)

BASE = "base"  # workdir/pool/<BASE>/: a scratch pool's shared initialisation
PRETRAIN_RETRY_SEED = 100  # the seed of a retry's batch order: the member's first seed + 100 x attempt


def build_pool(settings: PoolSettings, task: Task, workdir: pathlib.Path, *, seed: int, distill: DistillSettings,
               evaluation: EvalSettings, engine: EngineSettings, mesh: MeshSettings,
               strategy: ml_collections.ConfigDict) -> Pool:
    """The pool of `settings` for a run of `seed`: scratch members are pretrained with the `distill`
    trainer's settings and checked with `evaluation`'s answer length; the engines sample `engine`'s
    shapes on `mesh`. A `strategy` (its ConfigDict) that needs a common base (dare_ties) is checked here."""
    if distill.replay and settings.kind != "scratch":  # refused at start-up, not at round 1
        raise ConfigError(f"config.distill.replay={distill.replay}: replay needs the pool's own training "
                          f"data, which only pool.kind='scratch' has (got {settings.kind!r}); set it to 0")
    if settings.kind not in ("scratch", "pretrained"):
        raise ConfigError(f"config.pool.kind={settings.kind!r}: expected 'scratch' or 'pretrained'")
    if settings.shared_init and (settings.kind != "scratch" or BASE in settings.models):
        raise ConfigError(f"config.pool.shared_init=True needs pool.kind='scratch' and no member named {BASE!r} "
                          f"(got kind {settings.kind!r}, models {list(settings.models)})")
    base = common_base(settings, workdir)
    if strategy.name == "dare_ties":  # refused at start-up, not at round 0's evaluation
        task_vector_base(strategy.base, base)
    devices = make_mesh(mesh.data, mesh.fsdp, mesh.tensor)
    # the engines sample on `mesh` (rows over data x fsdp, weights as the sharding rules say); on one
    # device they keep the single-device path
    engines = {"max_batch": engine.max_batch, **({"mesh": devices} if devices.size > 1 else {})}
    if settings.kind == "pretrained":
        return Pool(_pretrained_members(settings, devices), base=base, engine_options=engines)
    if settings.shared_init:
        _save_shared_init(settings, seed, workdir / "pool" / BASE)
    return Pool(_scratch_members(settings, task, workdir, seed, distill, evaluation.max_new_tokens), base=base,
                engine_options=engines)


def common_base(settings: PoolSettings, workdir: pathlib.Path) -> str | None:
    """The checkpoint all members start from, if they share one: a scratch pool's shared
    initialisation, or the source of a pretrained pool whose members are all one checkpoint."""
    if settings.kind == "scratch":
        return str(workdir / "pool" / BASE) if settings.shared_init else None
    sources = {str(m) for m in settings.models}
    return sources.pop() if len(sources) == 1 else None


def _pretrained_members(settings: PoolSettings, mesh) -> list[Member]:
    names = [str(m).rstrip("/").split("/")[-1] for m in settings.models]
    members = []
    for i, (source, name) in enumerate(zip(settings.models, names)):
        model, tokenizer = load(source, dtype=settings.dtype, compute_dtype=settings.compute_dtype, mesh=mesh)
        if tokenizer is None:
            raise ConfigError(f"config.pool.models[{i}]={source!r} has no tokenizer files")
        members.append(Member(f"{name}#{i}" if names.count(name) > 1 else name, model, tokenizer))
    return members


def _initial_model(settings: PoolSettings, seed: int) -> Transformer:
    """A freshly initialised `pool.preset` model sized for `tiny_tokenizer()`."""
    vocab = tiny_tokenizer().vocab_size
    return create(preset(settings.preset, vocab_size=vocab + (-vocab % 8)), seed=seed)


def _save_atomically(model: Transformer, tokenizer: Tokenizer, path: pathlib.Path) -> None:
    """`save_hf` into a temporary directory renamed to `path`: a kill leaves no half-written model."""
    with atomic_path(path) as tmp:
        save_hf(model, tmp, tokenizer)


def _save_shared_init(settings: PoolSettings, seed: int, path: pathlib.Path) -> None:
    """The scratch pool's one initialisation (member 0's seed in a run of `seed`), saved once at `path`."""
    if not path.exists():
        _save_atomically(_initial_model(settings, seed * 1000), tiny_tokenizer(), path)


def _scratch_members(settings: PoolSettings, task: Task, workdir: pathlib.Path, seed: int, distill: DistillSettings,
                     max_new_tokens: int) -> list[Member]:
    """Every member trained on its own slice (cached in workdir/pool/<name>/); the members not cached
    yet train at once, stacked in one compiled step (`distill_members`, `distill.stack_students`; else
    one after another), each with its own data, seed and steps. The pretraining check: a member that
    answers (greedy) less than `pool.pretrain_check` of its own training problems right did not learn
    them (it stalled), and its training continues from where it stopped for another `pretrain_steps`
    (a new schedule, its batches in another order), at most `pool.pretrain_attempts` attempts in all; the
    best attempt is kept, and every attempt's fit is saved with the member (pretraining.json). A stalled
    member knows its letters but not the sums, and a fresh start on the same slice mostly stalls again
    (docs/experiments.md, session 16). The members train with the `distill` trainer's settings but
    their own learning rate and batch size, fully (no LoRA), and the check's answers are up to
    `max_new_tokens` long."""
    names, tokenizer = list(settings.models), tiny_tokenizer()
    cached = {i: load(workdir / "pool" / name)[0] for i, name in enumerate(names) if (workdir / "pool" / name).exists()}
    waiting = [i for i in range(len(names)) if i not in cached]
    if waiting and distill.stack_students:
        # a kill between the members' saves: train the whole stack again, attempts and all, so the
        # missing members come out as in an uninterrupted run (a smaller stack rounds differently)
        waiting = list(range(len(names)))
    items = {i: member_items(settings, task, i, seed) for i in waiting}
    trainer = dataclasses.replace(distill, learning_rate=settings.pretrain_learning_rate,
                                  batch_size=settings.pretrain_batch, lora_rank=0)
    attempts: dict[int, list[dict]] = {i: [] for i in waiting}
    # the shared initialisation is every member's start (weight merging needs it)
    models = {i: load(workdir / "pool" / BASE)[0] if settings.shared_init else _initial_model(settings, seed * 1000 + i)
              for i in waiting}
    best: dict[int, tuple[dict, float | None]] = {}  # a member's best attempt: its parameters and fit
    for attempt in range(settings.pretrain_attempts):
        if not waiting:
            break
        # the seed of a member's batch order: attempt 0 keeps the seeds runs have always used
        seeds = [seed * 1000 + i + PRETRAIN_RETRY_SEED * attempt for i in waiting]
        for i in waiting:
            log.info("training pool member %s %s on %d examples (%d steps%s)", names[i],
                     "further" if attempt else "from scratch", len(items[i]), settings.pretrain_steps,
                     f", attempt {attempt + 1}" if attempt else "")
        label = f"pretrain {'+'.join(names[i] for i in waiting)}" + (f" #{attempt + 1}" if attempt else "")
        trained = _pretrain([models[i] for i in waiting], tokenizer, [pretraining_examples(items[i]) for i in waiting],
                            trainer, seeds, settings.pretrain_steps, distill.stack_students, label)
        retry = []
        for i, member_seed, (params, losses) in zip(waiting, seeds, trained):
            load_params_into(models[i], params)  # a retry continues from here
            fit = own_fit(models[i], tokenizer, items[i], max_new_tokens) if settings.pretrain_check else None
            attempts[i].append({"seed": member_seed, "fit": fit, "final_loss": float(losses[-1]) if len(losses) else None})
            if i not in best or (fit is not None and fit > best[i][1]):
                best[i] = (params, fit)  # the trainer copies what it starts from: these stay intact
            if fit is not None and fit < settings.pretrain_check:
                log.warning("pool member %s fits %.1f%% of its own training problems (< pool.pretrain_check=%.0f%%)",
                            names[i], 100 * fit, 100 * settings.pretrain_check)
                retry.append(i)
        waiting = retry
    for i, (params, _) in best.items():
        if i in cached:  # the same weights again (a stack retrained after a kill): keep the saved member
            continue
        load_params_into(models[i], params)
        with atomic_path(workdir / "pool" / names[i]) as tmp:
            save_hf(models[i], tmp, tokenizer)
            (tmp / "pretraining.json").write_text(json.dumps({"check": settings.pretrain_check,
                                                              "attempts": attempts[i]}, indent=1) + "\n")
    return [Member(name, cached[i] if i in cached else models[i], tokenizer) for i, name in enumerate(names)]


def _pretrain(models: list[Transformer], tokenizer: Tokenizer, examples: list[list[DistillExample]],
              settings: DistillSettings, seeds: list[int], steps: int, stacked: bool,
              label: str) -> list[tuple[dict, list[float]]]:
    """(parameters, losses) of each model trained `steps` steps on its examples: stacked, or one by one."""
    if stacked and len(models) > 1:
        params, losses = distill_members(models, tokenizer, examples, settings, seeds, progress=label, steps=steps)
        return list(zip(params, losses))
    return [distill_member(m, tokenizer, e, settings, seed=seed, progress=label, steps=steps)
            for m, e, seed in zip(models, examples, seeds)]


def own_fit(model: Transformer, tokenizer: Tokenizer, items: list[Example], max_new_tokens: int) -> float:
    """The share of a member's own training problems `items` its greedy answer gets right."""
    replies = Pool([Member("check", model, tokenizer)]).generate(
        [(0, ex.messages) for ex in items], SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0))
    return evaluate([r[0].text for r in replies], items).accuracy


def member_items(settings: PoolSettings, task: Task, index: int, seed: int) -> list[Example]:
    """Scratch member `index`'s slice of the train split (`member_slice`) in a run of `seed`."""
    train = task.split("train")
    return [train[k] for k in member_slice(train, index, len(settings.models), settings.slicing,
                                           settings.pretrain_fraction, seed)]


def pretraining_examples(items: list[Example]) -> list[DistillExample]:
    """What a scratch member is trained on: its train items (`member_items`), with reference solutions."""
    return [DistillExample(ex.id, ex.messages, ex.solution or ex.answer, source="pretraining") for ex in items]


def replay_examples(own: list[Example], n: int, seed: int) -> list[DistillExample]:
    """`n` of a scratch member's own pretraining examples (of its items `own`, `member_items`; a seeded
    draw without replacement, at most all of them), mixed into its distillation data by `distill.replay`
    so that it keeps what it knew (rehearsal); `build_pool` refuses replay for other pools."""
    examples = pretraining_examples(own)
    rows = np.random.default_rng(seed).permutation(len(examples))[:n]
    return [dataclasses.replace(examples[k], source="replay") for k in sorted(rows)]


def member_slice(train: list, index: int, num_members: int, slicing: str, fraction: float, seed: int) -> np.ndarray:
    """The train rows member `index` learns from.

    slicing "random": `fraction` of a seeded shuffle of the train split, starting at the member's own
    offset (index / num_members of the way along) and wrapping around, so slices are disjoint when
    fraction <= 1 / num_members and overlap with neighbours beyond.
    slicing "expert": the member's own groups of questions (the task's `Example.group`, for the
    synthetic task the first operand; a group belongs to member ord(its first character) mod N) plus
    `fraction` of every other member's, so each member is
    the expert on its share of the questions and a novice on the rest: the heterogeneous pool whose
    collaboration the papers build on.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"config.pool.pretrain_fraction={fraction}: expected a value in (0, 1]")
    order = np.random.default_rng(seed).permutation(len(train))
    if slicing == "random":
        start = index * len(train) // num_members
        return np.roll(order, -start)[:int(fraction * len(train))]
    if slicing == "expert":
        group = np.array([ord((train[k].group or train[k].question)[:1] or " ") % num_members for k in order])
        own, others = order[group == index], order[group != index]
        return np.concatenate([own, others[:int(fraction * len(others))]])
    raise ConfigError(f"config.pool.slicing={slicing!r}: expected 'random' or 'expert'")
