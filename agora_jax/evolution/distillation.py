"""From a collaboration's outputs to each member's training run (METHOD.md §1, "distill").

`distillation_data` applies the configured filter to the examples the strategy proposed (the
reference code keeps everything: `filter="none"`). `config.distill.method` picks one of the paper's
three distillation methods:

- `supervised`: every member trains on those examples (`distill_member`, next-token cross-entropy
  on the completions);
- `multi_student`: member i trains on them plus half of its own and half of the best member's
  single-model outputs on dev (`student_examples`);
- `logit`: every member is distilled on-policy toward the pool's fused next-token distribution on
  the dev prompts (`distill_pool_logits`; one stacked, jitted sample-and-update program).

Every member continues from its current weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from agora_jax.distill.data import DataConfig, Example, distill_dataset
from agora_jax.distill.lora import LoRAConfig
from agora_jax.distill.mixing import multi_student_datasets
from agora_jax.distill.onpolicy import OnPolicyTrainer, SamplingConfig, prompt_batch
from agora_jax.distill.stacked import teacher_pool
from agora_jax.distill.trainer import DistillConfig, Trainer
from agora_jax.models import Tokenizer, Transformer
from agora_jax.evolution.store import load_params_into, params_of
from agora_jax.strategies import DistillExample, Result
from agora_jax.strategies.pool import Member
from agora_jax.tasks import Example as TaskExample
from agora_jax.tasks import Task, extract_answer, grade

FILTERS = ("none", "answered", "agreement", "correct_on_dev")
_NOT_ANSWERS = ("judge", "verify", "rank")  # transcript roles that are verdicts, not answers
METHODS = ("supervised", "multi_student", "logit")


def distillation_data(collab: Result, task: Task, settings: ml_collections.ConfigDict) -> list[DistillExample]:
    """The examples to distill. Filters: `none` (keep all, the reference code's behaviour),
    `answered` (the completion states an extractable answer), `agreement` (answered, and at least
    `settings.min_agreement` of the item's answers in the collaboration's last round state the same
    answer: label-free, METHOD.md's agreement filter), `correct_on_dev` (an oracle upper bound for
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
    turns = [t for t in collab.transcript if t.item_id in items and t.role not in _NOT_ANSWERS]
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


def trainer_config(settings: ml_collections.ConfigDict, seed: int) -> DistillConfig:
    lora = (LoRAConfig(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout)
            if settings.lora_rank else None)
    data = DataConfig(batch_size=settings.batch_size, max_len=settings.max_len, epochs=settings.epochs, seed=seed,
                      buckets=tuple(settings.buckets) if settings.buckets else None)
    return DistillConfig(data=data, learning_rate=settings.lr, warmup_ratio=settings.warmup, lora=lora, seed=seed,
                         remat=settings.remat)


def distill_member(model: Transformer, tokenizer: Tokenizer, examples: Sequence[DistillExample],
                   settings: ml_collections.ConfigDict, seed: int, progress: str | None = None) -> list[float]:
    """Train `model` in place on `examples` (`settings.epochs`, or exactly `settings.steps` steps when
    set); returns the loss of every step. `progress` labels a tqdm bar."""
    if not examples:
        return []
    data = [Example(list(e.messages), e.completion, e.weight) for e in examples]
    cfg = trainer_config(settings, seed)
    steps = settings.get("steps")
    if steps:  # enough epochs to cover the requested steps
        epochs = math.ceil(steps * cfg.data.batch_size / len(data)) + 1
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, epochs=epochs))
    dataset = distill_dataset(data, tokenizer, cfg.data)
    num_steps = min(steps, len(dataset)) if steps else len(dataset)
    trainer = Trainer(model, cfg, num_steps)
    history = trainer.fit(dataset, max_steps=num_steps, progress=progress)
    load_params_into(model, params_of(trainer.export()))
    return [float(h["loss"]) for h in history]


def student_examples(collaborative: Sequence[Sequence[DistillExample]], own: Sequence[Sequence[str]],
                     dev_scores: Sequence[float], dev: Sequence[TaskExample], seed: int) -> list[list[DistillExample]]:
    """Multi-student KD (METHOD.md §1, method 2): member i's training set is its collaborative examples
    `collaborative[i]` plus half of its own single-model outputs `own[i]` (one per dev item) and half
    of the outputs of the member best on dev (`multi_student_datasets` picks the halves)."""
    outputs = [[Example(list(item.messages), text) for item, text in zip(dev, texts)] for texts in own]
    extras = multi_student_datasets([], outputs, dev_scores, seed=seed)
    return [list(mine) + [DistillExample("", x.messages, x.completion, source="multi_student") for x in extra]
            for mine, extra in zip(collaborative, extras)]


def distill_pool_logits(members: Sequence[Member], dev: Sequence[TaskExample], settings: ml_collections.ConfigDict,
                        seed: int, max_new_tokens: int, progress: str | None = None) -> list[list[float]]:
    """Logit / on-policy KD (METHOD.md §1, method 3): every member, stacked, learns the pool's fused
    next-token distribution on sequences of up to `max_new_tokens` sampled (`settings.logit.temperature`)
    from that fused pool, or from itself with `settings.logit.source = "student"`, for the dev prompts,
    `settings.epochs` passes. Needs one architecture and one tokenizer. Updates the members in place;
    returns each one's step losses."""
    if len({m.model.config for m in members}) > 1 or len({m.tokenizer.vocab_size for m in members}) > 1:
        raise ValueError("config.distill.method='logit' needs pool members of one architecture and one tokenizer")
    tokenizer = members[0].tokenizer
    cfg = trainer_config(settings, seed)
    batch = cfg.data.batch_size
    num_steps = math.ceil(len(dev) / batch) * settings.epochs
    length = max(len(tokenizer.encode_chat(list(item.messages))) for item in dev)
    sampling = SamplingConfig(num_new=max_new_tokens, temperature=settings.logit.temperature, source=settings.logit.source,
                              stop_ids=tuple(tokenizer.stop_ids))
    models = [m.model for m in members]
    trainer = OnPolicyTrainer(models, cfg, num_steps, teacher=teacher_pool(models), sampling=sampling)
    order = np.random.default_rng(seed).permutation(num_steps * batch) % len(dev)
    key = jax.random.key(seed)
    losses = []
    for step in tqdm.trange(num_steps, desc=progress, disable=progress is None, dynamic_ncols=True, leave=False):
        ids, mask = prompt_batch(tokenizer, [dev[k] for k in order[step * batch:(step + 1) * batch]], length)
        metrics, _ = trainer.step_on_policy(ids, mask, jax.random.fold_in(key, step))
        losses.append(np.asarray(metrics["loss"], float))
    for member, trained in zip(members, trainer.export()):
        load_params_into(member.model, params_of(trained))
    return np.stack(losses, axis=1).tolist() if losses else [[] for _ in members]
