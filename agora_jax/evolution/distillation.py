"""From a collaboration's outputs to each member's training run (METHOD.md §1, "distill").

`distillation_data` applies the configured filter to the examples the strategy proposed (the
reference code keeps everything: `filter="none"`); `distill_member` trains one member in place
with the `agora_jax.distill` trainer, continuing from its current weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import ml_collections

from agora_jax.distill.data import DataConfig, Example, distill_dataset
from agora_jax.distill.lora import LoRAConfig
from agora_jax.distill.trainer import DistillConfig, Trainer
from agora_jax.models import Tokenizer, Transformer
from agora_jax.evolution.store import load_params_into, params_of
from agora_jax.strategies import DistillExample, Result
from agora_jax.tasks import Task, extract_answer, grade

FILTERS = ("none", "answered", "correct_on_dev")


def distillation_data(collab: Result, task: Task, settings: ml_collections.ConfigDict) -> list[DistillExample]:
    """The examples to distill. Filters: `none` (keep all, the reference code's behaviour),
    `answered` (the completion states an extractable answer), `correct_on_dev` (an oracle
    upper bound for ablations: uses dev labels, which the method itself never needs)."""
    if settings.filter not in FILTERS:
        raise ValueError(f"config.distill.filter={settings.filter!r}; expected one of {', '.join(FILTERS)}")
    examples = list(collab.examples)
    if settings.filter == "none":
        return examples
    gold = {ex.id: ex for ex in task.dev}
    kept = []
    for e in examples:
        item = gold[e.item_id]
        answer = extract_answer(e.completion, item.answer_type, item.choices)
        if answer is None:
            continue
        if settings.filter == "correct_on_dev" and not grade(answer, item.answer, item.answer_type, item.choices):
            continue
        kept.append(e)
    return kept


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
