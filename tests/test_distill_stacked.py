"""N students in one compiled step equal N single steps; on-policy KD samples and distils in one jit."""

import jax
import numpy as np
import pytest
from flax import nnx

from agora_jax.distill.data import DataConfig, distill_dataset
from agora_jax.distill.lora import LoRAConfig
from agora_jax.distill.onpolicy import OnPolicyTrainer, SamplingConfig, prompt_batch, sample
from agora_jax.distill.stacked import StackedTrainer, stack_models, teacher_pool
from agora_jax.distill.trainer import DistillConfig, Trainer
from agora_jax.models import create, tiny_tokenizer
from agora_jax.records import DistillExample, pair


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


jit_sample = jax.jit(sample, static_argnums=(0, 5))


def sets() -> list[list[DistillExample]]:
    return [[pair(f"q{i}{j}", f"a{i * j}") for j in range(8)] for i in range(2)]


@pytest.mark.parametrize("lora", [None, pytest.param(LoRAConfig(rank=4, alpha=8.0, dropout=0.1), marks=pytest.mark.slow)])
def test_stacked_step_equals_single_steps(tok, lora):
    cfg = DistillConfig(data=DataConfig(batch_size=4, max_len=64), learning_rate=1e-2, lora=lora, loss_chunk=32,
                        micro_batch_size=2)
    ds = distill_dataset(sets(), tok, cfg.data)
    stacked = StackedTrainer([create("tiny", seed=i) for i in range(2)], cfg, len(ds))
    stacked_losses = [stacked.step(ds[s])["loss"] for s in range(2)]
    assert stacked._step._cache_size() == 1
    stacked_params = stacked.params()
    for i in range(2):
        single = Trainer(create("tiny", seed=i), cfg.replace(seed=cfg.seed + i), len(ds))
        losses = [single.step(jax.tree.map(lambda x: x[i], ds[s]))["loss"] for s in range(2)]
        np.testing.assert_allclose([l[i] for l in stacked_losses], losses, rtol=1e-5)
        # to 1e-4, not rounding: Adam amplifies reduction-order differences of near-zero gradients (GPU)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, atol=1e-4), stacked_params, single.params())
    assert len(stacked.export()) == 2


def test_sampler_matches_greedy_full_forward(tok):
    model = create("tiny", seed=3)
    graphdef, params = stack_models([model])
    ids, mask = prompt_batch(tok, ["hello", "what is one plus one?"], 40)
    batch = jit_sample(graphdef, params, ids, mask, jax.random.PRNGKey(0), SamplingConfig(num_new=6, temperature=0.0))
    seq, attn = batch["input_ids"], batch["attention_mask"]
    assert seq.shape == (2, 46) and np.asarray(batch["loss_weights"]).sum() == 12
    # every sampled token is the argmax of the full-sequence forward at the previous position
    logits = model(seq, attn)
    np.testing.assert_array_equal(np.argmax(logits[:, 39:-1], -1), np.asarray(seq[:, 40:]))


def test_sampler_stops_rows_at_stop_tokens(tok):
    graphdef, params = stack_models([create("tiny", seed=5)])
    ids, mask = prompt_batch(tok, ["a", "b", "c", "d"], 24)
    vocab = list(range(264))
    batch = jit_sample(graphdef, params, ids, mask, jax.random.PRNGKey(1),
                       SamplingConfig(num_new=30, temperature=5.0, stop_ids=tuple(vocab[:60])))
    tokens, live = np.asarray(batch["input_ids"][:, 24:]), np.asarray(batch["attention_mask"][:, 24:])
    for row, alive in zip(tokens, live):
        stops = np.flatnonzero(row < 60)
        end = stops[0] + 1 if len(stops) else len(row)
        np.testing.assert_array_equal(alive, np.arange(len(row)) < end)  # live through the stop token only
    np.testing.assert_array_equal(np.asarray(batch["loss_weights"][:, 23:-1]), live)


def test_sampler_row_mixes_pick_each_rows_teacher(tok):
    """A one-hot teacher mix per row samples that row as its teacher alone (same keys), token for token."""
    models = [create("tiny", seed=s) for s in (11, 12)]
    graphdef, params = stack_models(models)
    ids, mask = prompt_batch(tok, ["hello", "what is one plus one?", "a"], 40)
    cfg = SamplingConfig(num_new=8, temperature=1.0)
    mixed = jit_sample(graphdef, params, ids, mask, jax.random.PRNGKey(0), cfg,
                       np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32))
    alone = [jit_sample(*stack_models([m]), ids, mask, jax.random.PRNGKey(0), cfg) for m in models]
    for row, teacher in enumerate([0, 1, 0]):
        np.testing.assert_array_equal(mixed["input_ids"][row], alone[teacher]["input_ids"][row])
    assert not np.array_equal(alone[0]["input_ids"][:, 40:], alone[1]["input_ids"][:, 40:])  # the mix matters


@pytest.mark.parametrize("source", ["pool", pytest.param("student", marks=pytest.mark.slow)])
def test_onpolicy_kd_one_program_kl_falls(tok, source):
    teachers = [create("tiny", seed=s) for s in (7, 8)]
    for t in teachers:
        t.embed[...] = t.embed[...] * 8.0
    cfg = DistillConfig(learning_rate=1e-2, warmup_ratio=0.0, lora=None, loss_chunk=64)
    trainer = OnPolicyTrainer([create("tiny", seed=0), create("tiny", seed=1)], cfg, 25, teacher=teacher_pool(teachers),
                              sampling=SamplingConfig(num_new=12, temperature=0.7, source=source))
    ids, mask = prompt_batch(tok, ["hi", "name a colour", "2+2?"], 32)
    losses = []
    for i in range(25):
        metrics, batch = trainer.step_on_policy(ids, mask, jax.random.PRNGKey(i))
        losses.append(metrics["loss"])
    assert trainer._onpolicy._cache_size() == 1  # sampling + update: one compiled program
    assert batch["input_ids"].shape == (2, 3, 44)
    losses = np.asarray(losses)
    assert (losses[:3].mean(0) > 0.5).all()
    assert (losses[-3:].mean(0) < 0.5 * losses[:3].mean(0)).all(), losses


def test_stacked_supervised_students_equal_their_runs_alone(tok):
    """`distill_members`: three students of unequal data (so unequal runs and schedules) and their own
    seeds, in one compiled step, end where `distill_member` takes each alone: every step's loss and the
    weights within 1e-5."""
    import dataclasses

    import ml_collections
    from agora_jax.evolution.config import base_config
    from agora_jax.evolution.distillation import distill_member, distill_members
    from agora_jax.evolution.settings import settings_of

    distill = settings_of(base_config(None, ml_collections.ConfigDict(dict(name="debate")))).distill
    settings = dataclasses.replace(distill, lora_rank=0, lora_alpha=16.0, lora_dropout=0.1, batch_size=4,
                                   max_len=64, epochs=2, buckets=(32, 64), learning_rate=3e-3, warmup_ratio=0.25,
                                   remat=False)
    data = [[pair(f"q{i}{j}", f"a{i * j}" * (1 + j % 3)) for j in range(n)] for i, n in enumerate((11, 6, 0))]
    models, seeds = [create("tiny", seed=i) for i in range(3)], [5, 17, 29]
    stacked, stacked_losses = distill_members(models, tok, data, settings, seeds)
    assert [len(l) for l in stacked_losses] == [6, 4, 0]  # 2 epochs of ceil(n / 4) batches (one bucket each)
    for i in range(3):
        params, losses = distill_member(models[i], tok, data[i], settings, seed=seeds[i])
        np.testing.assert_allclose(stacked_losses[i], losses, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), stacked[i], params)
    jax.tree.map(np.testing.assert_array_equal, stacked[2], nnx.to_pure_dict(nnx.state(models[2], nnx.Param)))
    # pretraining's form: exactly `steps` steps each, over as many passes as its data needs
    stacked, stacked_losses = distill_members(models[:2], tok, data[:2], settings, seeds[:2], steps=5)
    for i in range(2):
        params, losses = distill_member(models[i], tok, data[i], settings, seed=seeds[i], steps=5)
        assert len(losses) == len(stacked_losses[i]) == 5
        np.testing.assert_allclose(stacked_losses[i], losses, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), stacked[i], params)
