"""Distillation data: chat formatting as for generation, completion-only targets, bucketing, shuffling,
host sharding and a resumable iterator."""

import dataclasses

import jax
import numpy as np
import pytest

from agora_jax.distill import data as data_lib
from agora_jax.distill.data import DataConfig, distill_dataset, plan_batches, student_steps, tokenize
from agora_jax.models import tiny_tokenizer
from agora_jax.records import DistillExample, pair


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def examples(n: int) -> list[DistillExample]:
    return [pair(f"Q{i}: " + "x" * (i * 7 % 90), f"answer {i}") for i in range(n)]


def test_tokenize_uses_generation_format(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    rec = tokenize(tok, pair(messages, "4"), max_len=512)
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    completion = tok.encode(tok.format_completion("4"))
    assert rec.ids.tolist() == prompt + completion
    assert rec.completion.tolist() == [False] * len(prompt) + [True] * len(completion)
    assert tok.decode(completion, skip_special_tokens=False).endswith("<|im_end|>\n")
    # a plain prompt string is one user message
    assert tokenize(tok, pair("2+2?", "4"), 512).ids.tolist() == (
        tok.encode_chat([{"role": "user", "content": "2+2?"}]) + completion)


def test_truncation_and_dropping(tok):
    rec = tokenize(tok, pair("hi", "a long answer " * 20), max_len=40)
    assert len(rec.ids) == 40 and rec.completion[-1]
    assert tokenize(tok, pair("x" * 100, "y"), max_len=40) is None


def test_batch_targets_and_loss_weights(tok):
    ds = distill_dataset([pair("hello", "world", weight=2.0)], tok, DataConfig(batch_size=2, max_len=64))
    batch = ds[0]
    rec = tokenize(tok, pair("hello", "world"), 64)
    n = len(rec.ids)
    assert batch["input_ids"].shape == (2, 64)
    np.testing.assert_array_equal(batch["input_ids"][0, :n], rec.ids)
    np.testing.assert_array_equal(batch["targets"][0, :n - 1], rec.ids[1:])
    np.testing.assert_array_equal(batch["attention_mask"][0], np.arange(64) < n)
    # weight on exactly the positions whose target is a completion token, scaled by the example weight
    np.testing.assert_array_equal(batch["loss_weights"][0, :n - 1], 2.0 * rec.completion[1:])
    assert batch["loss_weights"][0, n - 1:].sum() == 0
    assert not batch["attention_mask"][1].any() and batch["loss_weights"][1].sum() == 0  # padding row


def test_plan_covers_each_example_once_per_epoch_in_buckets():
    lengths = np.random.default_rng(0).integers(5, 500, 103)
    cfg = DataConfig(batch_size=8, max_len=512, epochs=2, seed=3)
    plan = plan_batches(lengths, cfg)
    seen = np.concatenate([rows[rows >= 0] for rows, _ in plan])
    assert sorted(seen.tolist()) == sorted(list(range(103)) * 2)
    for rows, length in plan:
        real = rows[rows >= 0]
        assert length in cfg.bucket_lengths() and (lengths[real] <= length).all()
        smaller = [b for b in cfg.bucket_lengths() if b < length]
        assert not smaller or (lengths[real] > max(smaller)).all()  # the smallest bucket that fits
    assert [r.tolist() for r, _ in plan] == [r.tolist() for r, _ in plan_batches(lengths, cfg)]
    other = plan_batches(lengths, dataclasses.replace(cfg, seed=4))
    assert [r.tolist() for r, _ in plan] != [r.tolist() for r, _ in other]


def test_host_sharding_splits_every_global_batch(tok, monkeypatch):
    cfg = DataConfig(batch_size=4, max_len=128, seed=1)
    full = distill_dataset(examples(10), tok, cfg)
    per_host = []
    for host in range(2):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        per_host.append(distill_dataset(examples(10), tok, cfg))
    assert len(per_host[0]) == len(per_host[1]) == len(full)
    for step in range(len(full)):
        halves = [per_host[h][step] for h in range(2)]
        assert halves[0]["input_ids"].shape == (2, full[step]["input_ids"].shape[1])
        np.testing.assert_array_equal(np.concatenate([h["input_ids"] for h in halves]), full[step]["input_ids"])


def test_iterator_state_resumes(tok):
    ds = distill_dataset(examples(20), tok, DataConfig(batch_size=2, max_len=128, epochs=2))
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["input_ids"] for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want)


def test_stacked_students_see_exactly_their_own_runs(tok):
    """Each stacked student passes over its own examples `epochs` times, batch for batch as alone with
    its seed; one that finishes first gets empty batches, never repeated data."""
    sets, seeds = [examples(12), examples(5)], [3, 7]
    cfg = DataConfig(batch_size=4, max_len=128, epochs=2)
    ds = distill_dataset(sets, tok, cfg, seeds=seeds)
    alone = [distill_dataset(mine, tok, dataclasses.replace(cfg, seed=seed)) for mine, seed in zip(sets, seeds)]
    assert student_steps(sets, tok, cfg, seeds) == [len(a) for a in alone] and len(ds) == len(alone[0]) > len(alone[1])
    for s in range(len(ds)):
        batch = ds[s]
        assert batch["input_ids"].shape[:2] == (2, 4)
        for i, own in enumerate(alone):
            if s < len(own):  # its own step s, right-padded to the stack's length
                length = own[s]["input_ids"].shape[1]
                for key in own[s]:
                    np.testing.assert_array_equal(batch[key][i][:, :length], own[s][key])
                assert not batch["attention_mask"][i][:, length:].any()
            else:
                assert batch["loss_weights"][i].sum() == 0 and not batch["attention_mask"][i].any()


def test_stack_batches_pads_to_longest():
    a = {"input_ids": np.ones((1, 3), np.int32), "targets": np.ones((1, 3), np.int32),
         "attention_mask": np.ones((1, 3), bool), "loss_weights": np.ones((1, 3), np.float32)}
    b = {k: np.concatenate([v, v], axis=1) for k, v in a.items()}
    out = data_lib.stack_batches([a, b], pad_id=0)
    assert out["input_ids"].shape == (2, 1, 6)
    assert out["attention_mask"][0, 0, 3:].sum() == 0 and out["loss_weights"][0, 0, 3:].sum() == 0
