"""A training step sharded over an 8-device CPU mesh (data x fsdp x tensor = 2 x 2 x 2) equals the
one-device step. Runs in a subprocess: the device count must be set before jax is imported."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from agora_jax.distill.data import DataConfig, distill_dataset
    from agora_jax.distill.lora import LoRAConfig
    from agora_jax.distill.stacked import StackedTrainer
    from agora_jax.distill.trainer import DistillConfig, Trainer
    from agora_jax.models import create, make_mesh, tiny_tokenizer
    from agora_jax.records import pair

    tok = tiny_tokenizer()
    examples = [pair(f"question {i}", f"answer {i * i}") for i in range(8)]
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # Adam divides by |g|: reduction-order noise in a near-zero gradient moves its update by up to lr;
    # adam_eps = 1e-6 bounds that amplification so 1e-5 compares the sharded arithmetic itself
    common = dict(learning_rate=1e-3, adam_eps=1e-6, loss_chunk=64)
    for lora in (None, LoRAConfig(rank=8, alpha=16.0, dropout=0.1)):
        cfg = DistillConfig(data=DataConfig(batch_size=8, max_len=64), lora=lora, micro_batch_size=4, **common)
        ds = distill_dataset(examples, tok, cfg.data)
        runs = {}
        for name, m in (("one", None), ("mesh", mesh)):
            trainer = Trainer(create("tiny", seed=0), cfg, len(ds), mesh=m)
            losses = [float(trainer.step(ds[s])["loss"]) for s in range(2)]
            runs[name] = (losses, jax.device_get(trainer.params()))
            if m is not None:  # really sharded: a layer weight is split over fsdp and tensor
                q = trainer.frozen["layers"]["q"] if lora else trainer.state.params["layers"]["q"]
                assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (2, 32, 32)
        np.testing.assert_allclose(runs["mesh"][0], runs["one"][0], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), runs["mesh"][1], runs["one"][1])
        print("LOSSES", lora is not None, runs["one"][0], runs["mesh"][0])

    # stacked students on the mesh (leading model axis replicated, the rest sharded)
    cfg = DistillConfig(data=DataConfig(batch_size=8, max_len=64), lora=None, **common)
    ds = distill_dataset([examples, examples[::-1]], tok, cfg.data)
    stacked = {name: StackedTrainer([create("tiny", seed=0), create("tiny", seed=1)], cfg, len(ds), mesh=m)
               for name, m in (("one", None), ("mesh", mesh))}
    losses = {name: t.step(ds[0])["loss"] for name, t in stacked.items()}
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 jax.device_get(stacked["mesh"].params()), jax.device_get(stacked["one"].params()))

    # the loop's distillation of a member trains on the pool's mesh (config.mesh), with the same losses
    import dataclasses

    import ml_collections
    from agora_jax.evolution import distillation
    from agora_jax.evolution.config import base_config
    from agora_jax.evolution.settings import settings_of
    meshes = []
    trainer_class = distillation.Trainer
    def recording_trainer(*args, **kwargs):
        meshes.append(kwargs.get("mesh"))
        return trainer_class(*args, **kwargs)
    distillation.Trainer = recording_trainer
    distill = settings_of(base_config(None, ml_collections.ConfigDict(dict(name="debate")))).distill
    settings = dataclasses.replace(distill, lora_rank=0, lora_alpha=16.0, lora_dropout=0.1, batch_size=8, max_len=64,
                                   epochs=1, buckets=(64,), learning_rate=1e-3, warmup_ratio=0.0, remat=False)
    member = {name: distillation.distill_member(create("tiny", seed=0), tok, examples, settings, seed=0, mesh=m)
              for name, m in (("one", None), ("mesh", mesh))}
    assert meshes == [None, mesh]
    np.testing.assert_allclose(member["mesh"][1], member["one"][1], rtol=1e-5)

    # a batch the mesh cannot split is refused at start-up, naming the key
    from agora_jax.errors import ConfigError
    from agora_jax.evolution.config import base_config
    from agora_jax.evolution.validate import validate
    from agora_jax.strategies.debate import defaults
    config = base_config("default", defaults())
    validate(config)  # 16 rows over data x fsdp = 8 devices
    config.distill.batch_size = 12
    try:
        validate(config)
        raise AssertionError("distill.batch_size=12 on 8 devices was accepted")
    except ConfigError as e:
        assert "config.distill.batch_size=12" in str(e) and "multiple of 8" in str(e), e
    print("OK")
""")


@pytest.mark.slow
def test_eight_device_mesh_step_equals_one_device_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
