"""`launch/export.py`: a run's generation leaves as HF directories (and PEFT adapters under LoRA) that
transformers and peft load with the logits of the restored members; what cannot be exported is refused."""

import importlib.util
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers

from agora_jax.distill import lora as lora_lib
from agora_jax.evolution.store import RunStore
from agora_jax.pool import load_params_into, params_of
from agora_jax.models import create, load, save_hf, tiny_tokenizer
from hf_reference import torch_logits

REPO = pathlib.Path(__file__).resolve().parents[1]
MEMBERS = ("m0", "m1")
LORA = lora_lib.LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
IDS = np.random.RandomState(0).randint(5, 261, (2, 11))


def _module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export = _module(REPO / "launch" / "export.py")


def _config():
    config = _module(REPO / "configs" / "debate.py").get_config(None)
    config.pool.models, config.pool.preset = MEMBERS, "tiny"
    config.task.synthetic.n_train = 200
    config.distill.lora_rank, config.distill.lora_alpha, config.distill.lora_dropout = LORA.rank, LORA.alpha, 0.1
    return config


def _lora_round(params: dict, seed: int) -> dict:
    """What a LoRA round checkpoints: a rank-4 adapter (B trained away from zero) merged into the
    targets' weights in float32, as `lora.apply` does, every other weight unchanged."""
    rng = np.random.default_rng(seed)
    layers = dict(params["layers"])
    for target in LORA.targets:
        w = np.asarray(layers[target])
        a = rng.standard_normal((w.shape[0], w.shape[1], LORA.rank)) / np.sqrt(w.shape[1])
        b = 0.05 * rng.standard_normal((w.shape[0], LORA.rank, w.shape[2]))
        layers[target] = (w + (LORA.scale * a @ b).astype(np.float32)).astype(np.float32)
    return {**params, "layers": layers}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    """A two-round LoRA run of two tiny members: the scratch pool's HF directories and generations 0..2."""
    workdir = tmp_path_factory.mktemp("run")
    for i, name in enumerate(MEMBERS):
        save_hf(create("tiny", seed=i), workdir / "pool" / name, tiny_tokenizer())
    generations = [{name: params_of(load(workdir / "pool" / name)[0]) for name in MEMBERS}]
    for r in (1, 2):
        generations.append({name: _lora_round(p, 10 * r + i) for i, (name, p) in enumerate(generations[-1].items())})
    store = RunStore(workdir)
    store.check_config(_config())
    for r, params in enumerate(generations):
        store.save_generation(r, params, {"round": r})
    store.close()
    return workdir


def _restored_logits(workdir: pathlib.Path, generation: int) -> dict[str, np.ndarray]:
    """Every member's logits on `IDS` with its weights of `generation` restored from the run store."""
    model = create("tiny")
    store = RunStore(workdir)
    params, _ = store.restore_generation(generation, {name: params_of(model) for name in MEMBERS})
    store.close()
    logits = {}
    for name in MEMBERS:
        load_params_into(model, params[name])
        logits[name] = np.asarray(model(jnp.asarray(IDS), jnp.ones(IDS.shape, jnp.int32)))
    return logits


def _hf_logits(directory: pathlib.Path, adapter: pathlib.Path | None = None) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype="float32")
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    return torch_logits(model.eval(), IDS, np.ones_like(IDS))


def test_latest_generation_loads_in_transformers_and_its_lora_adapter_in_peft(run, capsys):
    assert export.main([str(run)]) == 0
    out = run / "export" / "generation2"
    assert capsys.readouterr().out.split() == [str(out / n) for n in MEMBERS] + [
        str(out / f"{n}{suffix}") for n in MEMBERS for suffix in ("-generation1", "-lora")]
    messages = [{"role": "user", "content": "c+4+7="}]
    generation1, generation2 = _restored_logits(run, 1), _restored_logits(run, 2)
    for name in MEMBERS:
        restored = generation2[name]
        np.testing.assert_allclose(_hf_logits(out / name), restored, atol=1e-4, rtol=0)
        base = out / f"{name}-generation1"
        np.testing.assert_allclose(_hf_logits(base), generation1[name], atol=1e-4, rtol=0)
        assert np.abs(generation1[name] - restored).max() > 1e-2  # the adapter carries the round's update
        np.testing.assert_allclose(_hf_logits(base, out / f"{name}-lora"), restored, atol=1e-4, rtol=0)
        settings = json.loads((out / f"{name}-lora" / "adapter_config.json").read_text())
        assert (settings["r"], settings["lora_alpha"], settings["target_modules"]) == (
            4, 8.0, ["k_proj", "o_proj", "q_proj", "v_proj"])
        assert settings["base_model_name_or_path"] == str(base.absolute())
        tokenizer = transformers.AutoTokenizer.from_pretrained(out / name)
        assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == tiny_tokenizer().format_chat(messages))


def test_factor_recovers_a_merged_update_and_a_full_rank_update_is_refused():
    """`factor` inverts `delta` (an adapter's product comes back to float32 precision); `round_adapters`
    refuses a round that was not a rank-r LoRA update of the LoRA targets."""
    rng = np.random.default_rng(0)
    update = LORA.scale * rng.standard_normal((2, 64, 4)) @ rng.standard_normal((2, 4, 32))
    back = lora_lib.factor(update, 4, LORA.scale)
    np.testing.assert_allclose(LORA.scale * back["a"].astype(np.float64) @ back["b"], update,
                               atol=1e-6 * np.abs(update).max())
    params = params_of(create("tiny", seed=0))
    full = {**params, "layers": {**params["layers"], "q": params["layers"]["q"] + 0.01}}  # rank 1 per layer
    assert set(export.round_adapters(params, full, LORA, "m")) == {"q", "k", "v", "o"}
    full["layers"]["q"] = full["layers"]["q"] + 0.01 * rng.standard_normal(params["layers"]["q"].shape)
    with pytest.raises(export.ExportError, match="update of q is not of rank 4"):
        export.round_adapters(params, full, LORA, "m")
    full["layers"] = {**params["layers"], "up": params["layers"]["up"] + 0.01}
    with pytest.raises(export.ExportError, match="layers.up changed"):
        export.round_adapters(params, full, LORA, "m")


def test_what_is_not_a_restorable_generation_is_one_error_line(run, tmp_path, capsys):
    """Not a run, no such generation, a damaged one: one `error:` line, exit 1, nothing written."""
    def error(*argv: str) -> str:
        assert export.main(list(argv)) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "is not a run" in error(str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()  # nothing made where there was no run
    assert "has generations 0..2" in error(str(run), "--generation=3")
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("export"))
    for file in (damaged / "generations" / "1" / "params").rglob("*"):
        if file.is_file():
            file.write_bytes(b"")
    assert "cannot restore generation checkpoint" in error(str(damaged), "--generation=1", f"--out={tmp_path / 'o'}")
    assert not (tmp_path / "o").exists()
    # generation 2 itself is intact: its members leave merged, without the adapter whose base is gone
    assert export.main([str(damaged), f"--out={tmp_path / 'o'}"]) == 0
    streams = capsys.readouterr()
    assert streams.out.split() == [str(tmp_path / "o" / n) for n in MEMBERS]
    assert streams.err.startswith("warning: no PEFT adapter for generation 2: its base, generation 1, is not")
