"""Training throughput and memory: agora_jax's distillation trainer against Hugging Face PyTorch.

    python benchmarks/train.py            # 4 timed steps per side; appends rows to BENCHMARKS.md
    python benchmarks/train.py --quick    # 2 timed steps per side (< 10 minutes)
    python benchmarks/train.py --gpu      # ~0.5B model, bf16 compute, 8 x 2048: tokens/s, MFU and peak
                                          # accelerator memory, against HF PyTorch (bf16 autocast) on the GPU

CPU cases: SmolLM2-135M-Instruct (the registry's GGUF, same weights on both sides; a random
SmolLM2-shaped model if it cannot be had), AdamW, one batch of 8 x 256 tokens, next-token loss on
every position, fp32, 2 threads. Full fine-tuning and LoRA (r=64, alpha=16, dropout 0.1 on
q/k/v/o; the PyTorch side wraps those nn.Linear layers itself, as peft would). Every case runs in its
own subprocess, so its peak RSS (`ru_maxrss`) is its own. tokens/s excludes the first (compiling /
warm-up) step. Prints `RATIO train_tokens_per_s`, `RATIO train_peak_rss` (full fine-tuning) and the
same with a `lora_` prefix.

Stacked students (agora_jax alone, one process per case): three students of one architecture, each on
its own batch, trained by one compiled stacked step (`StackedTrainer`, how the loop distils a pool of
one architecture) against the same three trained one after another (three `Trainer`s, a step each),
same data and settings; `RATIO train_stacked3_vs_seq` = sequential seconds / stacked seconds for the
SmolLM2-shaped students (full fine-tuning, batch 4 x 128), `RATIO train_stacked3_vs_seq_small` for
the default pool's `small` preset (batch 16 x 48, the default run's distillation batch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import append_rows, machine  # noqa: E402

BATCH, LENGTH = 8, 256
GPU_BATCH, GPU_LENGTH = 8, 2048
LORA = dict(rank=64, alpha=16.0, dropout=0.1, targets=("q", "k", "v", "o"))
MARKER = "<!-- train-benchmark-rows -->"


def tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (BATCH, LENGTH)).astype(np.int32)


def token_batch(vocab: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A random next-token training batch of `shape` (`[B, T]`, or `[students, B, T]` for stacked
    students), every token weighted."""
    ids = np.random.default_rng(0).integers(0, vocab, shape).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids, bool),
            "targets": np.concatenate([ids[..., 1:], ids[..., :1]], axis=-1),
            "loss_weights": np.ones(ids.shape, np.float32)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def timed(step, steps: int) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each of the next `steps` calls)."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, times


# ---------------------------------------------------------------- the two sides (run in children)

def run_hf(weights: str, lora: bool, steps: int, gpu: bool = False) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    if gpu:  # the same ~0.5B shapes, random init, fp32 master weights, bf16 autocast (the usual recipe)
        c = gpu_config()
        config = transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
            head_dim=c.head_dim, rope_theta=c.rope.theta, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, c.vocab_size, (GPU_BATCH, GPU_LENGTH))).cuda()

        def gpu_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()

        first, times = timed(gpu_step, steps)
        return dict(first_s=first, step_s=times, device=torch.cuda.get_device_name(), batch=GPU_BATCH,
                    length=GPU_LENGTH, params=sum(p.numel() for p in model.parameters()),
                    peak_device_gb=torch.cuda.max_memory_allocated() / 1e9)
    torch.set_num_threads(2)
    path = pathlib.Path(weights)
    kwargs = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent if path.suffix == ".gguf" else path), dtype=torch.float32, **kwargs)
    model.train()
    if lora:
        model.requires_grad_(False)
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, lora_linear(getattr(layer.self_attn, name)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    ids = torch.from_numpy(tokens(model.config.vocab_size)).long()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    first, times = timed(step, steps)
    return dict(first_s=first, step_s=times, threads=torch.get_num_threads(), batch=BATCH, length=LENGTH)


def lora_linear(base):
    """peft-style LoRA around an nn.Linear: y = W x + (alpha / r) B(A(dropout(x)))."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.a = torch.nn.Linear(base.in_features, LORA["rank"], bias=False)
            self.b = torch.nn.Linear(LORA["rank"], base.out_features, bias=False)
            torch.nn.init.kaiming_uniform_(self.a.weight, a=5 ** 0.5)
            torch.nn.init.zeros_(self.b.weight)
            self.drop = torch.nn.Dropout(LORA["dropout"])
            self.scale = LORA["alpha"] / LORA["rank"]

        def forward(self, x):
            return self.base(x) + self.scale * self.b(self.a(self.drop(x)))

    return LoRALinear()


def run_agora(weights: str, lora: bool, steps: int, gpu: bool = False) -> dict:
    import jax

    from agora_jax.distill.data import DataConfig
    from agora_jax.distill.lora import LoRAConfig
    from agora_jax.distill.trainer import DistillConfig, Trainer
    from agora_jax.models import create, load

    if gpu:
        model, batch, length = create(gpu_config(), seed=0), GPU_BATCH, GPU_LENGTH
        cfg = DistillConfig(compute_dtype="bfloat16", loss_chunk=2048)
    else:
        model, batch, length = load(weights)[0], BATCH, LENGTH
        cfg = DistillConfig()
    cfg = cfg.replace(data=DataConfig(batch_size=batch, max_len=length), lora=LoRAConfig(**LORA) if lora else None)
    vocab = model.config.vocab_size
    trainer = Trainer(model, cfg, num_steps=1000)
    del model
    ids = np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids, bool),
            "targets": np.concatenate([ids[:, 1:], ids[:, :1]], axis=1),
            "loss_weights": np.concatenate([np.ones((batch, length - 1)), np.zeros((batch, 1))], axis=1).astype(np.float32)}
    first, times = timed(lambda: jax.block_until_ready(trainer.step(data)), steps)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(first_s=first, step_s=times, device=jax.devices()[0].device_kind, batch=batch, length=length,
                params=sum(x.size for x in jax.tree.leaves(trainer.frozen or trainer.state.params)),
                peak_device_gb=stats.get("peak_bytes_in_use", 0) / 1e9)


def run_stacked(weights: str, steps: int, small: bool) -> dict:
    """Seconds per step of 3 students one after another and of the same 3 stacked (medians)."""
    import jax

    from agora_jax.distill.data import DataConfig
    from agora_jax.distill.stacked import StackedTrainer
    from agora_jax.distill.trainer import DistillConfig, Trainer
    from agora_jax.models import create, load, preset

    if small:
        models, batch, length = [create(preset("small", vocab_size=264), seed=i) for i in range(3)], 16, 48
    else:
        base = load(weights)[0]
        models, batch, length = [base] * 3, 4, 128  # same start, own data: the loop's pool of copies
    cfg = DistillConfig(data=DataConfig(batch_size=batch, max_len=length), lora=None)
    data = token_batch(models[0].config.vocab_size, (3, batch, length))
    singles = [Trainer(m, cfg.replace(seed=i), num_steps=1000) for i, m in enumerate(models)]

    def sequential():
        for i, t in enumerate(singles):
            jax.block_until_ready(t.step({k: v[i] for k, v in data.items()}))

    seq_first, seq_times = timed(sequential, steps)
    singles.clear()  # frees their states before the stacked one is built
    stacked = StackedTrainer(models, cfg, 1000)
    del models
    first, times = timed(lambda: jax.block_until_ready(stacked.step(data)), steps)
    return dict(first_s=first, step_s=times, seq_first_s=seq_first, seq_step_s=seq_times, batch=3 * batch,
                length=length)


def child(args: argparse.Namespace) -> None:
    if args.child.startswith("stacked"):
        result = run_stacked(args.weights, args.steps, small=args.child == "stacked_small")
        result.update(peak_rss_gb=peak_rss_gb())
        print("RESULT " + json.dumps(result), flush=True)
        return
    run = run_hf if args.child == "hf" else run_agora
    result = run(args.weights, args.lora, args.steps, args.gpu)
    result.update(peak_rss_gb=peak_rss_gb())
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration

def weights_path(tmp: pathlib.Path) -> tuple[str, str]:
    """(path both sides load, description): the registry's SmolLM2 GGUF, else a random HF directory."""
    try:
        from agora_jax.models.registry import resolve

        return str(resolve("smollm2-135m-instruct")), "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)"
    except Exception as e:  # no network / registry not usable: same shapes, random weights
        print(f"registry unavailable ({type(e).__name__}: {e}); using a random SmolLM2-shaped model", flush=True)
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                      num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                      tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "smollm2-random")
    return str(tmp / "smollm2-random"), "random SmolLM2-shaped llama (registry unavailable)"


def spawn(side: str, weights: str, lora: bool, steps: int, gpu: bool = False) -> dict:
    """Run one side in its own process (its own peak memory; JAX and PyTorch never share an accelerator)."""
    cmd = ([sys.executable, __file__, "--child", side, "--weights", weights, "--steps", str(steps)]
           + ["--lora"] * lora + ["--gpu"] * gpu)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{side} (lora={lora}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["tokens_per_s"] = result["batch"] * result["length"] / float(np.median(result["step_s"]))
    return result


def cpu_rows(steps: int, command: str) -> list[str]:
    date = datetime.date.today().isoformat()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights, description = weights_path(pathlib.Path(tmp))
        print(f"weights: {description}", flush=True)
        for lora in (False, True):
            hf = spawn("hf", weights, lora, steps)
            ours = spawn("agora", weights, lora, steps)
            prefix = "lora_" if lora else ""
            speed = ours["tokens_per_s"] / hf["tokens_per_s"]
            rss = ours["peak_rss_gb"] / hf["peak_rss_gb"]
            print(f"{prefix or 'full_'}finetune: agora_jax {ours['tokens_per_s']:.1f} tok/s, "
                  f"{ours['peak_rss_gb']:.2f} GB peak RSS (compile+first step {ours['first_s']:.0f} s); "
                  f"HF PyTorch {hf['tokens_per_s']:.1f} tok/s, {hf['peak_rss_gb']:.2f} GB", flush=True)
            print(f"RATIO {prefix}train_tokens_per_s {speed:.2f}", flush=True)
            print(f"RATIO {prefix}train_peak_rss {rss:.2f}", flush=True)
            rows.append(f"| {date} | {'LoRA r=64 q,k,v,o' if lora else 'full fine-tune'} | "
                        f"{ours['tokens_per_s']:.1f} / {hf['tokens_per_s']:.1f} = {speed:.2f} | "
                        f"{ours['peak_rss_gb']:.2f} / {hf['peak_rss_gb']:.2f} = {rss:.2f} | {ours['first_s']:.0f} | "
                        f"{description}; {machine()} | `{command}` |")
        rows += stacked_rows(weights, description, steps, command)
    return rows


def stacked_rows(weights: str, description: str, steps: int, command: str, prefix: str = "") -> list[str]:
    """Three students stacked in one step against three steps one after another, same data: SmolLM2-shaped
    (`weights`) and the default pool's `small` preset; RATIO lines `<prefix>train_stacked3_vs_seq[_small]`."""
    date = datetime.date.today().isoformat()
    rows = []
    for side, name, case in (("stacked", "train_stacked3_vs_seq", "3 students stacked vs sequential, 3 x 4 x 128"),
                             ("stacked_small", "train_stacked3_vs_seq_small",
                              "3 `small` students stacked vs sequential, 3 x 16 x 48")):
        result = spawn(side, weights, False, steps)
        seq, one = float(np.median(result["seq_step_s"])), float(np.median(result["step_s"]))
        print(f"{case}: sequential {seq * 1e3:.0f} ms, stacked {one * 1e3:.0f} ms per step of all three "
              f"(stacked compile + first step {result['first_s']:.0f} s)", flush=True)
        print(f"RATIO {prefix}{name} {seq / one:.2f}", flush=True)
        rows.append(f"| {date} | {prefix}{case} | {result['tokens_per_s']:.1f} stacked; sequential / stacked time = "
                    f"{seq * 1e3:.0f} / {one * 1e3:.0f} ms = {seq / one:.2f} | {result['peak_rss_gb']:.2f} | "
                    f"{result['first_s']:.0f} | {description if side == 'stacked' else 'random init'}; {machine()} | "
                    f"`{command}` |")
    return rows


def gpu_config():
    """A ~0.5B llama-style config (Qwen2.5-0.5B shapes, untied head for a clean FLOP count)."""
    from agora_jax.models import ModelConfig, RopeConfig

    return ModelConfig(family="llama", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                       num_heads=14, num_kv_heads=2, head_dim=64, rope=RopeConfig(theta=1e6), tie_embeddings=False,
                       param_dtype="float32", dtype="bfloat16")


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5": 197.0, "TPU v5p": 459.0}


def mfu(result: dict) -> str:
    """Model FLOPs utilisation of a `--gpu` side: 6 x matmul params + causal attention, per token."""
    cfg = gpu_config()
    d, layers, t = cfg.hidden_size, cfg.num_layers, result["length"]
    matmul_params = result["params"] - cfg.vocab_size * d  # the embedding lookup is no matmul
    flops_per_token = 6 * matmul_params + 12 * layers * t * cfg.num_heads * cfg.head_dim / 2  # causal attention
    peak = next((v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0]))
                 if k in result["device"]), None)
    return f"{100 * flops_per_token * result['tokens_per_s'] / (peak * 1e12):.1f} %" if peak else "unknown peak"


def gpu_rows(steps: int, command: str) -> list[str]:
    """Full fine-tuning of a ~0.5B model in bf16 (fp32 master weights), batch 8 x 2048, both sides."""
    ours, hf = spawn("agora", "", False, steps, gpu=True), spawn("hf", "", False, steps, gpu=True)
    speed = ours["tokens_per_s"] / hf["tokens_per_s"]
    memory = ours["peak_device_gb"] / hf["peak_device_gb"]
    for name, r in (("agora_jax", ours), ("HF PyTorch", hf)):
        print(f"gpu {name}: {r['device']}: {r['tokens_per_s']:.0f} tokens/s, MFU {mfu(r)}, "
              f"peak {r['peak_device_gb']:.1f} GB, first step {r['first_s']:.0f} s", flush=True)
    print(f"RATIO gpu_train_tokens_per_s {speed:.2f}", flush=True)
    print(f"RATIO gpu_train_peak_memory {memory:.2f}", flush=True)
    date = datetime.date.today().isoformat()
    rows = [f"| {date} | GPU full fine-tune 0.5B, bf16 compute, 8 x 2048 (MFU {mfu(ours)} / {mfu(hf)}) | "
            f"{ours['tokens_per_s']:.0f} / {hf['tokens_per_s']:.0f} = {speed:.2f} | "
            f"{ours['peak_device_gb']:.1f} / {hf['peak_device_gb']:.1f} (device) = {memory:.2f} | "
            f"{ours['first_s']:.0f} | random init, same shapes both sides; {machine()} | `{command}` |"]
    with tempfile.TemporaryDirectory() as tmp:  # where one small student leaves the GPU idle, stacking pays
        weights, description = weights_path(pathlib.Path(tmp))
        rows += stacked_rows(weights, description, steps, command, prefix="gpu_")
    return rows


SECTION = ("## Distillation trainer (benchmarks/train.py)\n\n"
           "SmolLM2-135M, AdamW, batch 8 x 256, fp32, 2 threads; each side in its own process. "
           "Columns: tokens/s agora_jax / HF PyTorch = ratio, peak RSS GB agora_jax / HF = ratio.\n\n"
           "| date | case | tokens/s (ratio) | peak RSS GB (ratio) | compile + first step s | weights, machine "
           "| command |\n|---|---|---|---|---|---|---|\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed steps per case")
    parser.add_argument("--gpu", action="store_true", help="a ~0.5B model on the accelerator, both sides")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--child", choices=("hf", "agora", "stacked", "stacked_small"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    steps = 2 if args.quick else 4
    command = "python benchmarks/train.py" + " --quick" * args.quick + " --gpu" * args.gpu
    rows = gpu_rows(steps, command) if args.gpu else cpu_rows(steps, command)
    if not args.no_write:
        append_rows(MARKER, SECTION, rows)


if __name__ == "__main__":
    main()
