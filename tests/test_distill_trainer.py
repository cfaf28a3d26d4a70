"""The distillation trainer: memorisation, LoRA, gradient accumulation, KD, mixed precision, export,
and restoring a checkpoint mid-epoch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from agora_jax.distill import lora as lora_lib
from agora_jax.distill.checkpoint import Checkpointer
from agora_jax.distill.data import DataConfig, distill_dataset
from agora_jax.distill.lora import LoRAConfig
from agora_jax.distill.stacked import teacher_pool
from agora_jax.distill.trainer import DistillConfig, Trainer, learning_rate_schedule, schedule_horizon
from agora_jax.models import create, tiny_tokenizer
from agora_jax.records import DistillExample, pair

FACTS = [("capital of France?", "Paris."), ("2+3?", "5"), ("colour of the sky?", "blue"),
         ("opposite of hot?", "cold"), ("first letter?", "A"), ("largest planet?", "Jupiter")]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def facts(weight: float = 1.0) -> list[DistillExample]:
    return [pair(q, a, weight) for q, a in FACTS]


def config(**changes) -> DistillConfig:
    base = DistillConfig(data=DataConfig(batch_size=6, max_len=64, epochs=1), learning_rate=1e-2, warmup_ratio=0.0,
                         lora=None, loss_chunk=32)
    return base.replace(**changes)


def test_memorises_a_small_set(tok):
    cfg = config(data=DataConfig(batch_size=6, max_len=64, epochs=100))
    ds = distill_dataset(facts(), tok, cfg.data)
    model = create("tiny", seed=0)
    trainer = Trainer(model, cfg, len(ds))
    losses = [float(m["loss"]) for m in trainer.fit(ds)]
    assert losses[0] > 4.0
    assert np.mean(losses[-5:]) < 0.05, losses[-5:]  # completion tokens memorised (nats per token)
    np.testing.assert_array_equal(model.embed[...], create("tiny", seed=0).embed[...])  # the input model is intact


def test_lora_keeps_base_bit_identical_and_merges(tok):
    cfg = config(lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "gate")),
                 data=DataConfig(batch_size=6, max_len=64, epochs=5))
    model = create("tiny", seed=0)
    base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    ds = distill_dataset(facts(), tok, cfg.data)
    trainer = Trainer(model, cfg, len(ds))
    losses = [float(m["loss"]) for m in trainer.fit(ds)]
    assert losses[-1] < losses[0]
    # the base weights never change, bit for bit
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.frozen), base)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model))), base)
    # the merged model: W + (alpha / r) * A @ B per layer for targets, the rest untouched
    merged = nnx.to_pure_dict(nnx.state(trainer.export()))
    adapters = jax.device_get(trainer.state.params)
    for name in ("q", "v", "gate"):
        a, b = np.asarray(adapters[name]["a"], np.float64), np.asarray(adapters[name]["b"], np.float64)
        assert np.abs(b).max() > 0
        for layer in range(model.config.num_layers):
            want = base["layers"][name][layer] + 2.0 * a[layer] @ b[layer]
            np.testing.assert_allclose(merged["layers"][name][layer], want, rtol=1e-6, atol=1e-7)
    for name in ("k", "o", "up", "down", "attn_norm"):
        np.testing.assert_array_equal(merged["layers"][name], base["layers"][name])
    np.testing.assert_array_equal(merged["embed"], base["embed"])
    # the exported model computes with the merged weights
    ids = jnp.asarray(ds[0]["input_ids"])
    via_merge = lora_lib.merge(create("tiny", seed=0), adapters, cfg.lora)(ids)
    np.testing.assert_allclose(trainer.export()(ids), via_merge, rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_equals_one_batch(tok):
    ds = distill_dataset(facts(), tok, config().data)
    results, trainers = [], []
    for micro in (None, 2):
        trainers.append(Trainer(create("tiny", seed=0), config(micro_batch_size=micro), 4))
        metrics = [trainers[-1].step(ds[0]), trainers[-1].step(ds[0])]
        results.append((metrics, trainers[-1].params()))
    # a trainer of the same setup reuses the compiled step (e.g. the next round of the evolution loop)
    assert Trainer(create("tiny", seed=1), config(micro_batch_size=2), 4)._step is trainers[-1]._step
    (m1, p1), (m2, p2) = results
    for a, b in zip(m1, m2):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # Adam divides by sqrt(v): a near-zero gradient summed in another order (GPU reductions) can move
    # that coordinate's update by a fraction of lr = 1e-2, so parameters agree to 1e-4, not to rounding
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), p1, p2)


def test_kd_toward_fixed_teacher_drives_kl_down(tok):
    teachers = [create("tiny", seed=s) for s in (7, 8)]
    for t in teachers:  # sharpen the pool so its distribution is far from the student's
        t.embed[...] = t.embed[...] * 8.0
    cfg = config(objective="kd", divergence="forward_kl", data=DataConfig(batch_size=6, max_len=64, epochs=25))
    ds = distill_dataset(facts(), tok, cfg.data)
    trainer = Trainer(create("tiny", seed=0), cfg, len(ds), teacher=teacher_pool(teachers))
    losses = [float(m["loss"]) for m in trainer.fit(ds)]
    assert losses[0] > 0.5
    assert np.mean(losses[-3:]) < 0.3 * losses[0], (losses[0], losses[-3:])


def test_bf16_compute_with_fp32_master_weights(tok):
    ds = distill_dataset(facts(), tok, config().data)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(create("tiny", seed=0), config(compute_dtype=dtype), 4)
        losses[dtype] = [float(trainer.step(ds[0])["loss"]) for _ in range(3)]
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.params))
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25])
def test_schedule_is_optax_warmup_cosine_with_a_traced_horizon(ratio):
    """The step's schedule, its horizon an argument, gives optax's numbers for every run length."""
    cfg = DistillConfig(learning_rate=3e-4, warmup_ratio=ratio)
    traced = jax.jit(lambda counts, horizon: jax.vmap(learning_rate_schedule(cfg, horizon))(counts))
    for n in (1, 2, 7, 25, 63, 125, 800):
        horizon = schedule_horizon(cfg, n)
        assert horizon[0] == round(ratio * n) and horizon[1] == max(n, horizon[0] + 1)
        counts = jnp.arange(n + 3, dtype=jnp.int32)
        reference = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, int(horizon[0]), int(horizon[1]), 0.0)
        np.testing.assert_allclose(traced(counts, horizon), jax.vmap(reference)(counts), rtol=1e-6,
                                   atol=1e-6 * cfg.learning_rate)


def test_schedule_warmup_then_cosine(tok):
    cfg = DistillConfig(learning_rate=1e-3, warmup_ratio=0.1)
    schedule = learning_rate_schedule(cfg, schedule_horizon(cfg, 100))
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(55)), 0.5e-3, rtol=1e-3)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    assert DistillConfig().learning_rate == 1e-5 and DistillConfig().data.batch_size == 16
    assert DistillConfig().lora == LoRAConfig(rank=64, alpha=16.0, dropout=0.1, targets=("q", "k", "v", "o"))


def test_restore_mid_epoch_continues_with_identical_losses(tok, tmp_path):
    cfg = config(lora=LoRAConfig(rank=4, alpha=8.0), data=DataConfig(batch_size=2, max_len=64, epochs=2),
                 learning_rate=3e-3)
    ds = distill_dataset(facts(), tok, cfg.data)  # 3 steps per epoch, 6 in all
    straight = [float(m["loss"]) for m in Trainer(create("tiny", seed=0), cfg, len(ds)).fit(ds)]
    first = Trainer(create("tiny", seed=0), cfg, len(ds))
    part1 = first.fit(ds, checkpointer=Checkpointer(tmp_path), save_every=2, max_steps=5)  # stops inside epoch 2
    resumed = Trainer(create("tiny", seed=0), cfg, len(ds))
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.latest_step() == 5 and checkpointer.meta()["step"] == 5
    part2 = resumed.fit(ds, checkpointer=checkpointer)
    assert resumed.steps_done == len(ds)
    np.testing.assert_array_equal([float(m["loss"]) for m in part1 + part2], straight)
