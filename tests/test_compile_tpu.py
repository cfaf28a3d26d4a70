"""Ahead-of-time TPU compilation (`agora_jax.compile`, `launch/compile.py`) on this CPU-only host.

The TPU tests need libtpu (`pip install -e ".[tpu]"`, which CI installs) and are skipped without it;
the shapes and the cycle count of compiled HLO are checked everywhere.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from agora_jax.compile.hlo import program_cycles
from agora_jax.models.shapes import HUB_CONFIGS, abstract_model, architecture

REPO = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")

# Two loops as XLA writes them: a scan (`i < 28`, a constant) around a 100-cycle fusion, and a loop
# that ends on data (the decode loop) whose body holds that scan and 5 cycles of its own.
HLO = """HloModule m

%scan_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused.1, backend_config={"estimated_cycles":"100"}
}

%scan_cond (p: (s32[], f32[8])) -> pred[] {
  %constant.1 = s32[]{:T(128)} constant(28)
  %get-tuple-element.1 = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%get-tuple-element.1, %constant.1), direction=LT, metadata={op_name="lt"}
}

%decode_body (p: (s32[], s32[], f32[8])) -> (s32[], s32[], f32[8]) {
  %while.1 = (s32[], f32[8]) while(%t), condition=%scan_cond, body=%scan_body
  %add.1 = s32[] add(%a, %b), backend_config={"estimated_cycles":"5"}
}

%decode_cond (p: (s32[], s32[], f32[8])) -> pred[] {
  %get-tuple-element.2 = s32[] get-tuple-element(%p), index=0
  %get-tuple-element.3 = s32[] get-tuple-element(%p), index=1
  ROOT %lt.2 = pred[] compare(%get-tuple-element.2, %get-tuple-element.3), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %fusion.9 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused.9, backend_config={"estimated_cycles":"7"}
  %while.2 = (s32[], f32[8]) while(%t0), condition=%scan_cond, body=%scan_body
  %while.3 = (s32[], s32[], f32[8]) while(%t1), condition=%decode_cond, body=%decode_body
}
"""


def test_program_cycles_counts_scans_by_trip_count_and_data_loops_per_iteration():
    cycles = program_cycles(HLO)
    assert cycles.per_iteration == (28 * 100 + 5,)
    assert cycles.total == 7 + 28 * 100 + (28 * 100 + 5)


@pytest.mark.parametrize("name, params", [
    ("Qwen/Qwen2.5-1.5B-Instruct", 1_543_714_304),  # the published parameter counts
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
    ("Qwen/Qwen2.5-Math-7B-Instruct", 7_615_616_512),
    ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
])
def test_hub_architectures_have_their_published_sizes_without_weights(name, params):
    model = abstract_model(architecture(name, "bfloat16"))
    leaves = jax.tree.leaves(model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing materialised
    assert sum(math.prod(x.shape) for x in leaves) == params
    assert set(HUB_CONFIGS) >= {name}


def _tiny_config():
    """The default pool (3 scratch `small` models) fusing logits, distilled with LoRA on batches of
    4 x 32 tokens (the compile time of a TPU program grows with its tensors)."""
    from configs.logit_fusion import get_config

    config = get_config(None)
    config.distill.update(method="supervised", lora_rank=8, batch_size=4, max_len=32, buckets=(32,))
    return config


def _compile(config, workdir, **options):
    from agora_jax.compile import compile_run, programs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "SCORE_BATCH_TOKENS", 256)  # the scorer's rows, 8192 tokens in a run
        return compile_run(config, "v5e:2x2", workdir, rows=4, prompt_len=16, **options)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    return _compile(_tiny_config(), tmp_path_factory.mktemp("compile"))


@needs_libtpu
def test_tiny_run_compiles_every_program_sharded_and_fitting(tiny_report):
    names = [r.name for r in tiny_report.results]
    assert sorted(names) == sorted([
        "generate/single/prefill", "generate/single/decode", "generate/stacked3/prefill", "generate/stacked3/decode",
        "generate/fused/prefill", "generate/fused/decode", "score", "distill/train"])
    assert tiny_report.header["mesh"] == "data=1 fsdp=4 tensor=1 (4 devices)"
    for r in tiny_report.results:
        assert r.fits and 0 < r.memory["total"] < 16 << 30 and r.seconds > 0, r
        # the stacked weights (three members' layers: 2.4 MB arrays) are sharded, not replicated
        assert r.replicated == [], r.name
    decode = next(r for r in tiny_report.results if r.name == "generate/stacked3/decode")
    assert decode.tokens_per_second == pytest.approx(3 * 4 / decode.step_seconds)
    assert 0 < decode.hbm_roofline < 1
    train = next(r for r in tiny_report.results if r.name == "distill/train")
    assert 0 < train.mfu < 1
    assert "| distill/train | m0, m1, m2 |" in tiny_report.markdown


@needs_libtpu
@pytest.mark.parametrize("source, program", [("collaboration", "distill/stacked3"), ("pool", "distill/onpolicy3")])
def test_logit_kd_steps_lower_for_the_stacked_students(source, program):
    """Logit KD's steps (compiling them takes minutes on 2 cores: here they are only lowered)."""
    from agora_jax.compile import run_mesh, topology
    from agora_jax.compile.programs import Buckets, run_programs

    config = _tiny_config()
    config.distill.update(method="logit", logit=dict(source=source, temperature=0.7))
    mesh = run_mesh(config, topology("v5e:2x2"))
    (step,) = [p for p in run_programs(config, mesh, Buckets(4, 16, 16)) if p.name.startswith("distill/")]
    assert step.name == program and step.models == ("m0", "m1", "m2")
    lowered = step.lower()
    states = jax.tree.leaves(lowered.args_info[0][0])  # the students' train state, donated
    assert states and all(arg.donated for arg in states)
    everything = sum(math.prod(arg.shape) * arg.dtype.itemsize for arg in jax.tree.leaves(lowered.args_info))
    assert step.floor(4) < everything / 2  # a device holds its shard of the weights and optimizer state


@needs_libtpu
def test_weights_left_whole_on_every_device_are_reported(tmp_path):
    config = _tiny_config()
    config.mesh.data, config.mesh.fsdp = 4, 1  # data parallel: no mesh axis the weights' rules shard over
    report = _compile(config, tmp_path, only="generate/stacked3/decode")
    (decode,) = report.results
    assert decode.memory["total"] > 0 and decode.fits
    assert {name for name in ("gate", "up", "down") if any(name in a for a in decode.replicated)} == {
        "gate", "up", "down"}, decode.replicated


@needs_libtpu
def test_activations_are_split_over_the_batch_axes_under_a_mesh():
    """The residual stream of a forward pass lies over the batch's mesh axes, even from rows given
    whole to every device: XLA otherwise kept the weights still and every row on every fsdp device."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from agora_jax.compile import run_mesh, topology
    from agora_jax.models.sharding import place, state_shardings

    mesh = run_mesh(_tiny_config(), topology("v5e:2x2"))
    graphdef, state = nnx.split(abstract_model(architecture("smollm2-135m-instruct")))
    state = place(state, state_shardings(state, mesh))
    ids = jax.ShapeDtypeStruct((8, 16), jax.numpy.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state).hidden_states(ids))
    with jax.set_mesh(mesh):
        hidden = forward.lower(state, ids).compile().output_shardings
    assert tuple(hidden.spec)[:1] == ("fsdp",)


@needs_libtpu
def test_lora_adapters_and_their_moments_are_split_over_an_fsdp_mesh():
    """Every adapter of a 1.5B model on 4 fsdp devices is split: B's output and o's input lie on the
    tensor axis (size 1 here), so the rank axis takes fsdp (before, those 11 MB arrays were whole)."""
    from agora_jax.compile import run_mesh, topology
    from agora_jax.distill.lora import LORA_TARGETS, LoRAConfig, adapter_shardings, init_adapters

    mesh = run_mesh(_tiny_config(), topology("v5e:2x2"))
    cfg = architecture("Qwen/Qwen2.5-1.5B-Instruct", "bfloat16")
    adapters = jax.eval_shape(lambda: init_adapters(cfg, LoRAConfig(rank=64, targets=LORA_TARGETS), jax.random.key(0)))
    shardings = adapter_shardings(cfg, adapters, mesh)
    whole = [f"{name}.{ab}" for name, pair in shardings.items() for ab, s in pair.items() if s.is_fully_replicated]
    assert whole == []
    assert tuple(shardings["q"]["b"].spec) == tuple(shardings["q"]["a"].spec) == (None, "fsdp", None)


@needs_libtpu
def test_a_7b_pool_on_one_chip_is_refused_before_compiling(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "launch/compile.py", "--config=configs/debate.py:qwen2.5-7b",
                          "--topology=v5e:2x2", "--config.mesh.fsdp=1", f"--workdir={tmp_path}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and len(errors) == 1, run.stderr[-3000:]
    assert "generate/stacked2/prefill needs 38.87 GiB" in errors[0] and "22.87 GiB short" in errors[0]
    assert "data=1 fsdp=1 tensor=1 (1 device)" in errors[0]
    assert not (tmp_path / "compile_report.json").exists()


def test_the_engine_rows_compiled_for_are_the_configs_max_batch():
    import numpy as np
    from jax.sharding import Mesh

    from agora_jax.compile import run_buckets
    from agora_jax.compile.programs import Buckets
    from configs.debate import get_config

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    config = get_config("qwen2.5-1.5b")
    assert config.engine.max_batch == 64  # the hub variants' engine calls fit a 16 GiB v5e chip
    assert run_buckets(config, mesh, None, 1000) == Buckets(rows=64, prompt_len=1024, max_new=512)
    assert run_buckets(config, mesh, 48, 1024).rows == 64  # a power of two, as the engine pads it
    config.engine.max_batch = 8
    assert run_buckets(config, mesh, None, 1024).rows == 8

