"""From a collaboration's outputs to each member's training run (docs/method.md §1, "distill").

`distillation_data` applies the configured filter to the examples the strategy proposed (the
reference code keeps everything: `filter="none"`). `distill.method` (`settings.DistillSettings`, the
settings every function here gets) picks one of the paper's three distillation methods:

- `supervised`: every member trains on those examples (`distill_member`, next-token cross-entropy
  on the completions);
- `multi_student`: member i trains on them plus half of its own and half of the best member's
  single-model outputs on dev (`student_examples`);
- `logit`: every member matches the next-token distribution of the collaboration on its examples
  (`distill_pool_logits`, all members stacked in one program): the teacher is who produced each one
  (`DistillExample.teacher`: the fused pool, the member a router or the refine writer chose, the
  merged model of dare_ties), teacher-forced on the completions or on sequences sampled for the
  example prompts (`distill.logit.source`).

Every member continues from its current weights.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from agora_jax.distill.data import (DataConfig, Plan, Record, distill_dataset, real_steps, side_by_side_plans,
                                    student_steps, tokenize)
from agora_jax.distill.lora import LoRAConfig
from agora_jax.distill.mixing import multi_student_datasets
from agora_jax.distill.onpolicy import OnPolicyTrainer, SamplingConfig, prompt_batch
from agora_jax.distill.stacked import StackedTrainer, kd_batch, row_teacher_weights, teacher_pool
from agora_jax.distill.trainer import DistillConfig, Trainer
from agora_jax.models import Tokenizer, Transformer
from agora_jax.evolution.config import ConfigError
from agora_jax.evolution.settings import DistillSettings
from agora_jax.strategies import DistillExample, Result, Strategy
from agora_jax.pool import Member, Params, Pool, params_of
from agora_jax.tasks import Example as TaskExample
from agora_jax.tasks import Task, extract_answer, grade

FILTERS = ("none", "answered", "agreement", "correct_on_dev")
METHODS = ("supervised", "multi_student", "logit")
# logit KD's sequences: the examples' (teacher-forced), sampled from the teacher, sampled from the student
LOGIT_SOURCES = ("collaboration", "pool", "student")


def distillation_data(collab: Result, task: Task, settings: DistillSettings) -> list[DistillExample]:
    """The examples to distill. Filters: `none` (keep all, the reference code's behaviour),
    `answered` (the completion states an extractable answer), `agreement` (answered, and at least
    `settings.min_agreement` of the item's answers in the collaboration's last round state the same
    answer: label-free, docs/method.md's agreement filter), `correct_on_dev` (an oracle upper bound for
    ablations: uses dev labels, which the method itself never needs)."""
    if settings.filter not in FILTERS:
        raise ValueError(f"config.distill.filter={settings.filter!r}; expected one of {', '.join(FILTERS)}")
    examples = list(collab.examples)
    if settings.filter == "none":
        return examples
    gold = {ex.id: ex for ex in task.dev}
    agreement = last_round_agreement(collab, gold) if settings.filter == "agreement" else {}
    kept = []
    for e in examples:
        item = gold[e.item_id]
        answer = extract_answer(e.completion, item.answer_type, item.choices)
        if answer is None:
            continue
        if settings.filter == "agreement" and agreement.get((e.item_id, answer), 0.0) < settings.min_agreement:
            continue
        if settings.filter == "correct_on_dev" and not grade(answer, item.answer, item.answer_type, item.choices):
            continue
        kept.append(e)
    return kept


def last_round_agreement(collab: Result, items: dict[str, TaskExample]) -> dict[tuple[str, str], float]:
    """Share of each item's answers in its last transcript round (verdict roles aside) that state a
    given answer: `{(item id, answer): share}`."""
    turns = [t for t in collab.transcript if t.item_id in items and not t.role.is_verdict]
    last = {}
    for t in turns:
        last[t.item_id] = max(last.get(t.item_id, t.round), t.round)
    answers: dict[str, list] = {}
    for t in turns:
        if t.round == last[t.item_id]:
            item = items[t.item_id]
            answers.setdefault(t.item_id, []).append(extract_answer(t.output, item.answer_type, item.choices))
    return {(item_id, answer): said.count(answer) / len(said)
            for item_id, said in answers.items() for answer in set(said) if answer is not None}


def trainer_config(settings: DistillSettings, seed: int) -> DistillConfig:
    lora = (LoRAConfig(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout)
            if settings.lora_rank else None)
    data = DataConfig(batch_size=settings.batch_size, max_len=settings.max_len, epochs=settings.epochs, seed=seed,
                      buckets=tuple(settings.buckets) if settings.buckets else None)
    return DistillConfig(data=data, learning_rate=settings.learning_rate, warmup_ratio=settings.warmup_ratio, lora=lora, seed=seed,
                         remat=settings.remat)


def distill_member(model: Transformer, tokenizer: Tokenizer, examples: Sequence[DistillExample],
                   settings: DistillSettings, seed: int, progress: str | None = None,
                   steps: int | None = None, mesh: Mesh | None = None) -> tuple[Params, list[float]]:
    """Train a copy of `model` on `examples` (`settings.epochs`, or exactly `steps` steps when given:
    pretraining, `pool.pretrain_steps`) on `mesh` (the run's `mesh.*`; None: one device); returns its trained
    parameters (`model` is left as it was) and the loss of every step. `progress` labels a tqdm bar."""
    if not examples:
        return params_of(model), []
    cfg = trainer_config(settings, seed)
    dataset = distill_dataset(list(examples), tokenizer, cfg.data, steps=steps)
    trainer = Trainer(model, cfg, len(dataset), mesh=mesh)
    history = trainer.fit(dataset, progress=progress)
    return params_of(trainer.export()), [float(h["loss"]) for h in history]


def one_architecture(models: Sequence[Transformer], tokenizers: Sequence[Tokenizer]) -> bool:
    """Whether `models` can train stacked: one model config and one vocabulary."""
    return len({m.config for m in models}) == 1 and len({t.vocab_size for t in tokenizers}) == 1


def distill_members(models: Sequence[Transformer], tokenizer: Tokenizer, examples: Sequence[Sequence[DistillExample]],
                    settings: DistillSettings, seeds: Sequence[int], progress: str | None = None,
                    steps: int | None = None, mesh: Mesh | None = None) -> tuple[list[Params], list[list[float]]]:
    """`distill_member` of every model at once (`distill.stack_students`): model i trains on
    `examples[i]` with seed `seeds[i]` (its own epochs, or `steps` steps) and its own schedule, in one compiled step
    (`StackedTrainer`, one architecture and tokenizer; docs/method.md §3), so each ends as it would alone
    (to float rounding: tested). A model without examples is left as it was. Returns each one's trained
    parameters (the models are left as they were) and the loss of each of its steps."""
    trained, losses = [params_of(m) for m in models], [[] for _ in models]
    busy = [i for i, mine in enumerate(examples) if mine]
    if not busy:
        return trained, losses
    cfg = trainer_config(settings, seeds[busy[0]])
    data, own_seeds = [list(examples[i]) for i in busy], [seeds[i] for i in busy]
    own_steps = student_steps(data, tokenizer, cfg.data, own_seeds, steps)
    dataset = distill_dataset(data, tokenizer, cfg.data, own_seeds, steps)
    trainer = StackedTrainer([models[i] for i in busy], cfg, own_steps, seeds=own_seeds, mesh=mesh)
    history = trainer.fit(dataset, progress=progress)
    for k, (i, params) in enumerate(zip(busy, trainer.export())):
        trained[i], losses[i] = params_of(params), [float(np.asarray(h["loss"])[k]) for h in history[:own_steps[k]]]
    return trained, losses


def student_examples(collaborative: Sequence[Sequence[DistillExample]], own: Sequence[Sequence[str]],
                     dev_scores: Sequence[float], dev: Sequence[TaskExample], seed: int) -> list[list[DistillExample]]:
    """Multi-student KD (docs/method.md §1, method 2): member i's training set is its collaborative examples
    `collaborative[i]` plus half of its own single-model outputs `own[i]` (one per dev item) and half
    of the outputs of the member best on dev (`multi_student_datasets` picks the halves)."""
    outputs = [[DistillExample(item.id, list(item.messages), text, source="multi_student")
                for item, text in zip(dev, texts)] for texts in own]
    extras = multi_student_datasets([], outputs, dev_scores, seed=seed)
    return [list(mine) + extra for mine, extra in zip(collaborative, extras)]


def strategy_teachers(strategy: Strategy, pool: Pool, info: dict[str, Any],
                      examples: Sequence[DistillExample]) -> dict[str, Transformer]:
    """The models `strategy` built that `examples` name as their logit-KD teacher (dare_ties' merged
    model), rebuilt from the collaboration's `info`, so a resumed round gets the very same one."""
    named = {e.teacher for e in examples} - {None} - set(pool.names)
    if named - {strategy.name} or (named and not hasattr(strategy, "teacher_model")):
        raise ValueError(f"distillation examples name the teacher(s) {sorted(named)}: neither pool members nor a "
                         f"model strategy {strategy.name!r} builds")
    return {name: strategy.teacher_model(pool, info) for name in named}


def teacher_stack(examples: Sequence[DistillExample], members: Sequence[str]) -> list[str]:
    """The models logit KD runs as teachers, pool members first: every member when an example's
    teacher is the fused pool (None), else only the members named; then the strategy's own models."""
    named = {e.teacher for e in examples}
    return [m for m in members if None in named or m in named] + sorted(named - {None} - set(members))


def teacher_weights(example: DistillExample, stack: Sequence[str], members: Sequence[str]) -> np.ndarray:
    """The example's weights over `stack`: the fused pool's uniform mean of the members, or its one model."""
    wanted = members if example.teacher is None else [example.teacher]
    return np.asarray([1.0 / len(wanted) if name in wanted else 0.0 for name in stack], np.float32)


def distill_pool_logits(members: Sequence[Member], examples: Sequence[Sequence[DistillExample]],
                        built: Mapping[str, Transformer], settings: DistillSettings, seed: int,
                        max_new_tokens: int, progress: str | None = None) -> tuple[list[Params], list[list[float]]]:
    """Logit KD (docs/method.md §1, method 3): member i, stacked with the others, matches the teacher
    distribution of each of its own examples `examples[i]` (`DistillExample.teacher`: the fused pool,
    the member that wrote it, or a model the strategy built, `built[name]`), `settings.epochs` passes.
    `settings.logit.source`: "collaboration" teacher-forces the examples' completions; "pool" / "student"
    sample up to `max_new_tokens` tokens for the example prompts from that teacher / from the student
    (`settings.logit.temperature`), sampling and update in one jitted program. A member whose examples
    run out gets zero-weight steps, which leave it unchanged. Needs one architecture and one tokenizer.
    Returns each member's trained parameters (the members are left as they were) and step losses."""
    source = settings.logit.source
    if source not in LOGIT_SOURCES:
        raise ConfigError(f"config.distill.logit.source={source!r}; expected one of {', '.join(LOGIT_SOURCES)}")
    names = [m.name for m in members]
    stack = teacher_stack([e for mine in examples for e in mine], names)
    teachers = [{**{m.name: m.model for m in members}, **built}[name] for name in stack]
    if not one_architecture([*(m.model for m in members), *teachers], [m.tokenizer for m in members]):
        raise ValueError("config.distill.method='logit' needs pool members of one architecture and one tokenizer")
    tokenizer = members[0].tokenizer
    cfg = trainer_config(settings, seed)
    kept = [_tokenized(tokenizer, mine, cfg.data.max_len) for mine in examples]
    records = [[r for r, _ in pairs] for pairs in kept]
    mixes = [np.asarray([teacher_weights(e, stack, names) for _, e in pairs], np.float32).reshape(-1, len(stack))
             for pairs in kept]
    plans = side_by_side_plans([[len(r.ids) for r in recs] for recs in records], cfg.data)
    num_steps, steps = len(plans[0]), [real_steps(plan) for plan in plans]
    if not num_steps:
        return [params_of(m.model) for m in members], [[] for _ in members]
    models = [m.model for m in members]
    if source == "collaboration":
        trainer = StackedTrainer(models, cfg.replace(objective="kd"), steps, teacher=teacher_pool(teachers))

        def step(s: int) -> dict:
            return trainer.step(kd_batch(records, mixes, plans, s, tokenizer.pad_id))
    else:
        sampling = SamplingConfig(num_new=max_new_tokens, temperature=settings.logit.temperature, source=source,
                                  stop_ids=tuple(tokenizer.stop_ids))
        trainer = OnPolicyTrainer(models, cfg, steps, teacher=teacher_pool(teachers), sampling=sampling)
        step = _on_policy_steps(trainer, tokenizer, [[e for _, e in pairs] for pairs in kept], mixes, plans, seed)
    losses = [step(s)["loss"] for s in tqdm.trange(num_steps, desc=progress, disable=progress is None,
                                                   dynamic_ncols=True, leave=False)]
    return ([params_of(trained) for trained in trainer.export()],
            [[float(np.asarray(l)[i]) for l in losses[:n]] for i, n in enumerate(steps)])


def _tokenized(tokenizer: Tokenizer, examples: Sequence[DistillExample],
               max_len: int) -> list[tuple[Record, DistillExample]]:
    """The examples with a completion token within `max_len`, tokenised as for supervised training."""
    pairs = [(tokenize(tokenizer, e, max_len), e) for e in examples]
    return [(r, e) for r, e in pairs if r is not None]


def _on_policy_steps(trainer: OnPolicyTrainer, tokenizer: Tokenizer, examples: Sequence[Sequence[DistillExample]],
                     mixes: Sequence[np.ndarray], plans: Sequence[Plan], seed: int) -> Callable[[int], dict]:
    """Step s of on-policy logit KD: every student's planned example prompts, zero-weight rows where its
    plan has none; sampled once for all when every student has the same examples (and so the same plan)."""
    students = range(1 if all(mine == examples[0] for mine in examples) else len(examples))
    everything = [e for mine in examples for e in mine]
    length = max(len(tokenizer.encode_chat(list(e.messages))) for e in everything)
    key = jax.random.key(seed)

    def step(s: int) -> dict:
        prompts, weights, mix = [], [], []
        for i in students:
            rows = plans[i][s][0]
            chosen = [examples[i][k] if k >= 0 else everything[0] for k in rows]
            prompts.append(prompt_batch(tokenizer, chosen, length))
            weights.append([e.weight if k >= 0 else 0.0 for e, k in zip(chosen, rows)])
            mix.append(row_teacher_weights(mixes[i], rows))
        ids, mask = (np.stack(x) for x in zip(*prompts))
        metrics, _ = trainer.step_on_policy(ids, mask, jax.random.fold_in(key, s), np.stack(mix),
                                            np.asarray(weights, np.float32))
        return metrics

    return step
