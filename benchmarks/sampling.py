"""Generation throughput: agora_jax's sampling engine against Hugging Face transformers `generate`.

    python benchmarks/sampling.py            # CPU cases, best of 3 runs each; appends rows to BENCHMARKS.md
    python benchmarks/sampling.py --quick    # the same cases, one run each, compile time subtracted (< 10 minutes)
    python benchmarks/sampling.py --gpu      # decode tokens/s of a ~0.5B bf16 model at batch 64 and 256,
                                             # against transformers `generate` on the same GPU and weights,
                                             # and against the HBM-bandwidth roofline

CPU cases (greedy, exactly 128 new tokens on both sides, ~40-token chat prompts, fp32, 2 torch threads,
the same weights in the same process): SmolLM2-135M-Instruct at batch 1, 16 and 64; a tiny llama
(4 layers, d=256, vocab 32k, random init, exported to an HF checkpoint and loaded back) at batch 16;
a stacked pool of 3 SmolLM2-size models against the same 3 models run one after another (both
agora_jax). Tokens/s exclude compilation: every program is warmed up first (with --quick, the first
run's measured compile time is subtracted instead) and its compile time is reported separately. Each case prints `RATIO <case> <agora_jax / reference>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import append_rows, machine  # noqa: E402

NEW_TOKENS = 128
MARKER = "<!-- sampling benchmark rows -->"
QUESTIONS = [
    "What is the capital of France, and what river runs through it?",
    "Explain in two sentences why the sky looks blue during the day.",
    "Write a short haiku about autumn leaves falling in a quiet park.",
    "If a train travels 60 miles per hour for 2.5 hours, how far does it go?",
    "List three benefits of regular exercise for mental health.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "How many legs does a spider have, and how many does an insect have?",
]
# HBM bandwidth (GB/s) by device kind, for the decode roofline.
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L4": 300.0, "TPU v5 lite": 819.0, "TPU v5p": 2765.0,
           "TPU v4": 1200.0, "TPU v6": 1640.0}


@dataclasses.dataclass
class Result:
    case: str
    ours: float  # new tokens/s
    reference: float
    reference_name: str
    compile_s: float

    @property
    def ratio(self) -> float:
        return self.ours / self.reference

    def report(self) -> None:
        print(f"{self.case}: agora_jax {self.ours:.1f} tok/s, {self.reference_name} {self.reference:.1f} tok/s, "
              f"compile {self.compile_s:.1f} s", flush=True)
        print(f"RATIO {self.case} {self.ratio:.2f}", flush=True)


def best_rate(run: Callable[[], int], reps: int) -> float:
    """New tokens/s of the fastest of `reps` runs (`run` returns the number of new tokens)."""
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - start))
    return max(rates)


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    """~40-token chat prompts (the template's system prompt and one question)."""
    return [tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(batch)]


def hf_generate(model, prompts: list[list[int]], pad_id: int, device: str = "cpu") -> Callable[..., int]:
    """transformers' greedy `generate` on the left-padded `prompts`, forced to exactly `new_tokens`."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run(new_tokens: int = NEW_TOKENS) -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        if device != "cpu":
            torch.cuda.synchronize()
        return (out.shape[1] - width) * len(prompts)

    return run


def count_tokens(outs) -> int:
    """New tokens in `generate` results, nested lists of `Completion`s at any depth."""
    return len(outs.tokens) if hasattr(outs, "tokens") else sum(count_tokens(o) for o in outs)


def hf_copy(model, directory: pathlib.Path):
    """The transformers model holding our `model`'s weights (exported with `save_hf`)."""
    import torch
    import transformers

    from agora_jax.models import save_hf

    save_hf(model, directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def warm_rate(run: Callable[[], int], engines: list, reps: int) -> tuple[float, float]:
    """(new tokens/s, compile seconds) of `run`, an agora_jax call on `engines`. With `reps` > 1 the
    first call warms up (compiles) and the best of `reps` further calls counts; with `reps` == 1
    (--quick) the first call counts, its compile time (which the engines measure) subtracted."""
    compiled = sum(e.compile_seconds for e in engines)
    start = time.perf_counter()
    tokens = run()
    elapsed = time.perf_counter() - start
    compile_s = sum(e.compile_seconds for e in engines) - compiled
    if reps == 1:
        return tokens / (elapsed - compile_s), compile_s
    return best_rate(run, reps), compile_s


def versus_hf(case: str, engine, hf_model, prompts, pad_id: int, params, reps: int) -> Result:
    ours = lambda: count_tokens(engine.generate(prompts, params))  # noqa: E731
    reference = hf_generate(hf_model, prompts, pad_id)
    rate, compile_s = warm_rate(ours, [engine], reps)
    reference(4)  # warm-up
    result = Result(case, rate, best_rate(reference, reps), "transformers", compile_s)
    result.report()
    return result


def cpu_cases(reps: int) -> list[Result]:
    import torch

    from agora_jax.models import ModelConfig, RopeConfig, create, load
    from agora_jax.sampling import Engine, PoolEngine, SamplingParams

    torch.set_num_threads(2)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(), stop_strings=())
    model, tokenizer = load("smollm2-135m-instruct")
    engine = Engine(model, tokenizer)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = hf_copy(model, pathlib.Path(tmp) / "smollm2")
        for batch in (1, 16, 64):
            results.append(versus_hf(f"smollm2_b{batch}", engine, hf_model, chat_prompts(tokenizer, batch),
                                     tokenizer.pad_id, params, reps))
        del hf_model

        config = ModelConfig(family="llama", vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4,
                             num_heads=8, num_kv_heads=4, head_dim=32, rope=RopeConfig(theta=10000.0),
                             rms_norm_eps=1e-5)
        hf_tiny = hf_copy(create(config, seed=0), pathlib.Path(tmp) / "tiny")
        tiny, _ = load(pathlib.Path(tmp) / "tiny")
        rng = np.random.RandomState(0)
        prompts = [rng.randint(3, config.vocab_size, 40 + i % 5).tolist() for i in range(16)]
        results.append(versus_hf("tiny_b16", Engine(tiny, tokenizer), hf_tiny, prompts, 0, params, reps))
        del hf_tiny

    members = [model, create(model.config, seed=1), create(model.config, seed=2)]
    pool = PoolEngine(members, [tokenizer] * 3)
    engines = [Engine(m, tokenizer) for m in members]  # share compiled programs (same architecture)
    prompts = chat_prompts(tokenizer, 16)
    stacked = lambda: count_tokens(pool.generate([prompts] * 3, params))  # noqa: E731
    sequential = lambda: sum(count_tokens(e.generate(prompts, params)) for e in engines)  # noqa: E731
    stacked_rate, compile_s = warm_rate(stacked, [pool], reps)
    sequential_rate, _ = warm_rate(sequential, engines, reps)
    results.append(Result("pool3_vs_seq", stacked_rate, sequential_rate, "agora_jax sequential", compile_s))
    results[-1].report()
    return results


def gpu_config():
    """The `--gpu` decode case's model: Qwen2.5-0.5B shapes (24 layers), bf16 weights and compute."""
    from agora_jax.models import ModelConfig, RopeConfig

    return ModelConfig(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                       num_heads=14, num_kv_heads=2, head_dim=64, rope=RopeConfig(theta=1e6), tie_embeddings=True,
                       qkv_bias=True, param_dtype="bfloat16", dtype="bfloat16")


def gpu_cases(reps: int) -> list[Result]:
    """Decode tokens/s at batch 64 and 256 of a ~0.5B random-init bf16 model (Qwen2.5-0.5B shapes), 40-token
    prompts, 512 new tokens, against two references: transformers' greedy `generate` (bf16, sdpa, its
    default dynamic cache) on the same GPU and weights, and the HBM roofline (every step reads all weights
    and the KV cache of the tokens so far once)."""
    import jax
    import torch
    from flax import nnx

    from agora_jax.models import create, tiny_tokenizer
    from agora_jax.sampling import Engine, SamplingParams

    config = gpu_config()
    model = create(config, seed=0)
    kind = jax.devices()[0].device_kind
    bandwidth = next((gbs for name, gbs in HBM_GBS.items() if name in kind), None)
    if bandwidth is None:
        raise SystemExit(f"unknown HBM bandwidth for {kind!r}; add it to HBM_GBS")
    engine = Engine(model, tiny_tokenizer(), max_batch=256)
    params = SamplingParams(max_new_tokens=512, stop_token_ids=(), stop_strings=())
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = hf_copy(model, pathlib.Path(tmp) / "qwen").to("cuda", torch.bfloat16)

    def reference(prompts):
        run = hf_generate(hf_model, prompts, 0, device="cuda")
        return lambda: run(params.max_new_tokens)

    results = []
    for batch in (64, 256):
        prompts = [[5 + (i * 7 + j) % 250 for j in range(40)] for i in range(batch)]
        compiled = engine.compile_seconds
        engine.generate(prompts, params)
        compile_s = engine.compile_seconds - compiled
        rate = best_rate(lambda: count_tokens(engine.generate(prompts, params)), reps)
        hf_run = reference(prompts)
        hf_run()  # warm-up
        results.append(Result(f"gpu_decode_b{batch}", rate, best_rate(hf_run, reps), "transformers bf16", compile_s))
        results[-1].report()
        mean_context = 40 + params.max_new_tokens / 2
        kv_bytes = 2 * config.num_layers * batch * mean_context * config.num_kv_heads * config.head_dim * 2
        roofline = batch * bandwidth * 1e9 / (weight_bytes + kv_bytes)
        results.append(Result(f"gpu_decode_b{batch}_roofline", rate, roofline,
                              f"HBM roofline ({kind}, {bandwidth:.0f} GB/s)", compile_s))
        results[-1].report()
    return results


SECTION = ("## Sampling engine (benchmarks/sampling.py)\n\n"
           "| date | case | agora_jax tok/s | reference tok/s | ratio | compile s | machine | command |\n"
           "|---|---|---|---|---|---|---|---|\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run per case, compile time subtracted")
    parser.add_argument("--gpu", action="store_true", help="decode throughput against transformers and the HBM roofline")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.gpu:  # JAX and PyTorch share the accelerator: allocate on demand instead of taking 75% up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    command = "python benchmarks/sampling.py" + " --quick" * args.quick + " --gpu" * args.gpu
    reps = 1 if args.quick else 3
    results = gpu_cases(reps) if args.gpu else cpu_cases(reps)
    if not args.no_write:
        date, where = datetime.date.today().isoformat(), machine()
        append_rows(MARKER, SECTION, [f"| {date} | {r.case} | {r.ours:.1f} | {r.reference:.1f} ({r.reference_name}) | {r.ratio:.2f} | "
                     f"{r.compile_s:.1f} | {where} | `{command}` |" for r in results])


if __name__ == "__main__":
    main()
