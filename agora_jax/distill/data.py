"""Distillation data: (prompt, completion) examples (`records.DistillExample`, `records.pair`) ->
length-bucketed, shuffled, host-sharded batches; `weight` scales an example's loss.

Prompts are tokenised exactly as for generation (`tok.encode_chat(messages)`) and completions as
the chat template continues them (`tok.encode(tok.format_completion(text))`, end-of-turn included),
so the model learns the very format it is sampled with (docs/method.md §1). Only completion tokens are
targets.

The batch plan is computed once (it needs every example's length for bucketing) and is the same on
every host; a grain `MapDataset` over it does host sharding (`ds[process_index::process_count]`),
collation and gives a checkpointable iterator (`get_state` / `set_state`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import grain
import jax
import numpy as np

from agora_jax.models import Tokenizer
from agora_jax.records import DistillExample
Batch = dict[str, np.ndarray]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    """A tokenised example: `ids` = prompt + completion, `completion` marks the completion tokens."""

    ids: np.ndarray
    completion: np.ndarray
    weight: float


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How examples become batches. `batch_size` is the global batch of one optimizer step."""

    batch_size: int = 16
    max_len: int = 512
    epochs: int = 1
    seed: int = 0
    buckets: tuple[int, ...] | None = None  # padded lengths; None: powers of two from 64 up to max_len

    def bucket_lengths(self) -> tuple[int, ...]:
        if self.buckets:
            return tuple(sorted(self.buckets))
        lengths, n = [], 64
        while n < self.max_len:
            lengths.append(n)
            n *= 2
        return (*lengths, self.max_len)


def tokenize(tok: Tokenizer, example: DistillExample, max_len: int) -> Record | None:
    """Prompt and completion ids as for generation, truncated to `max_len`; None if no completion fits."""
    prompt = tok.encode_chat(example.messages, add_generation_prompt=True)
    completion = tok.encode(tok.format_completion(example.completion))
    ids = np.asarray(prompt + completion, np.int32)[:max_len]
    mask = (np.arange(len(ids)) >= len(prompt))
    if not mask[1:].any():  # the first token is never a target
        return None
    return Record(ids, mask, float(example.weight))


def tokenize_all(tok: Tokenizer, examples: Sequence[DistillExample], max_len: int) -> list[Record]:
    records = [r for r in (tokenize(tok, e, max_len) for e in examples) if r is not None]
    if len(records) < len(examples):
        log.warning("dropped %d of %d examples whose prompt fills max_len=%d", len(examples) - len(records),
                    len(examples), max_len)
    if not records:
        raise ValueError("no example has a completion token within max_len")
    return records


def plan_batches(lengths: Sequence[int], cfg: DataConfig, num_steps: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Global batches as (example indices, padded length); index -1 is an empty (zero-weight) row.

    Each epoch shuffles the examples (seeded), groups them by bucket, cuts batches within a bucket and
    shuffles the batch order. With `num_steps`, epochs continue until that many batches exist.
    """
    buckets = np.asarray(cfg.bucket_lengths())
    bucket_of = np.searchsorted(buckets, np.asarray(lengths))
    if (bucket_of >= len(buckets)).any():
        longest = int(np.max(lengths))
        raise ValueError(f"an example of {longest} tokens is longer than the largest bucket {buckets[-1]} "
                         f"(DataConfig.buckets; config.distill.buckets in a run)")
    rng = np.random.default_rng(cfg.seed)
    plan: list[tuple[np.ndarray, int]] = []
    epoch = 0
    while (epoch < cfg.epochs) if num_steps is None else (len(plan) < num_steps):
        order = rng.permutation(len(lengths))
        epoch_batches = []
        for b, length in enumerate(buckets):
            members = order[bucket_of[order] == b]
            for start in range(0, len(members), cfg.batch_size):
                rows = np.full(cfg.batch_size, -1, np.int64)
                chunk = members[start:start + cfg.batch_size]
                rows[:len(chunk)] = chunk
                epoch_batches.append((rows, int(length)))
        plan.extend(epoch_batches[i] for i in rng.permutation(len(epoch_batches)))
        epoch += 1
    return plan if num_steps is None else plan[:num_steps]


def collate(records: Sequence[Record], rows: np.ndarray, length: int, pad_id: int) -> Batch:
    """Right-padded arrays: inputs, attention mask, next-token targets and their loss weights."""
    n = len(rows)
    ids = np.full((n, length), pad_id, np.int32)
    attention = np.zeros((n, length), bool)
    completion = np.zeros((n, length), bool)
    weight = np.zeros((n, 1), np.float32)
    for i, r in enumerate(rows):
        if r < 0:
            continue
        rec = records[r]
        ids[i, :len(rec.ids)] = rec.ids
        attention[i, :len(rec.ids)] = True
        completion[i, :len(rec.ids)] = rec.completion
        weight[i] = rec.weight
    targets = np.concatenate([ids[:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
    target_is_completion = np.concatenate([completion[:, 1:], np.zeros((n, 1), bool)], axis=1)
    return {"input_ids": ids, "attention_mask": attention, "targets": targets,
            "loss_weights": target_is_completion * weight}


def stack_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """Stack per-student batches on a leading model axis, right-padding to their longest length."""
    length = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "targets": pad_id, "attention_mask": False, "loss_weights": 0.0}

    def pad(name: str, x: np.ndarray) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=fill[name])

    return {k: np.stack([pad(k, b[k]) for b in batches]) for k in batches[0]}


def _host_rows(rows: np.ndarray) -> list[np.ndarray]:
    """Split a global batch into the per-host row sets, host-minor (so `[p::count]` picks host p's)."""
    count = jax.process_count()
    if len(rows) % count:
        raise ValueError(f"batch size {len(rows)} does not split over {count} hosts")
    return list(np.split(rows, count))


Plan = list[tuple[np.ndarray, int]]


def side_by_side_plans(lengths: Sequence[Sequence[int]], cfg: DataConfig, seeds: Sequence[int] | None = None,
                       steps: int | None = None) -> list[Plan]:
    """Each student's batch plan over its own examples (`plan_batches`: `cfg.epochs` passes, or exactly
    `steps` batches, seeded by `seeds[i]`, default `cfg.seed` for all, so equal example lists give equal
    plans), extended to the longest with empty batches: no student repeats an example to fill the
    steps of another."""
    seeds = [cfg.seed] * len(lengths) if seeds is None else list(seeds)
    plans = [plan_batches(list(n), dataclasses.replace(cfg, seed=seed), steps) if len(n) else []
             for n, seed in zip(lengths, seeds)]
    steps = max(map(len, plans), default=0)
    empty = (np.full(cfg.batch_size, -1, np.int64), cfg.bucket_lengths()[0])
    return [plan + [empty] * (steps - len(plan)) for plan in plans]


def real_steps(plan: Plan) -> int:
    """The steps of a side-by-side plan that train (its padding comes last)."""
    return sum(bool((rows >= 0).any()) for rows, _ in plan)


def student_steps(examples: Sequence[Sequence[DistillExample]], tok: Tokenizer, cfg: DataConfig,
                  seeds: Sequence[int] | None = None, steps: int | None = None) -> list[int]:
    """How many steps each stacked student of `distill_dataset(examples, tok, cfg, seeds, steps)` trains:
    the length of its own run alone (its schedule's horizon, `StackedTrainer`)."""
    lengths = [[len(r.ids) for r in tokenize_all(tok, e, cfg.max_len)] for e in examples]
    return [real_steps(plan) for plan in side_by_side_plans(lengths, cfg, seeds, steps)]


def distill_dataset(examples: Sequence[DistillExample] | Sequence[Sequence[DistillExample]], tok: Tokenizer,
                    cfg: DataConfig, seeds: Sequence[int] | None = None, steps: int | None = None) -> grain.MapDataset:
    """This host's batches, one per optimizer step: `cfg.epochs` passes, or exactly `steps` batches.

    `examples` is one list (one student: arrays `[B, T]`) or one list per student (stacked students:
    arrays `[N, B, T]`, `side_by_side_plans` with `seeds`: each student passes over its own examples
    exactly as alone with its seed; one that finishes first gets empty batches).
    """
    stacked = bool(examples) and not isinstance(examples[0], DistillExample)
    per_student = [list(e) for e in examples] if stacked else [list(examples)]
    records = [tokenize_all(tok, e, cfg.max_len) for e in per_student]
    plans = side_by_side_plans([[len(r.ids) for r in recs] for recs in records], cfg, seeds, steps)
    steps = len(plans[0])
    # one entry per (step, host): that host's rows of every student, and each student's padded length
    entries = [tuple(zip(*(_host_rows(plan[s][0]) for plan in plans)))
               for s in range(steps)]
    lengths = [tuple(plan[s][1] for plan in plans) for s in range(steps)]
    flat = [(host_rows, lengths[s]) for s in range(steps) for host_rows in entries[s]]

    def load(entry: tuple[tuple[np.ndarray, ...], tuple[int, ...]]) -> Batch:
        rows, lens = entry
        batches = [collate(recs, r, n, tok.pad_id) for recs, r, n in zip(records, rows, lens)]
        return stack_batches(batches, tok.pad_id) if stacked else batches[0]

    return grain.MapDataset.source(flat)[jax.process_index()::jax.process_count()].map(load)
