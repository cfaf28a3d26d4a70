"""Where one decode step and one train step of a ~0.5B bf16 model spend their accelerator time.

    python benchmarks/gpu_profile.py [--out DIR]    # on a GPU (or TPU); writes DIR/profile.json, prints a table

Both programs are warmed up (compiled), then one call of each runs under `jax.profiler.trace` with a
Perfetto trace; the device events of that trace are summed by name: the number of kernels, their total
time, and the ten costliest kernels. Decode: the sampling engine generating 64 new tokens for 64 and 256
prompts (the summary is per token step); train: one full fine-tuning step of 8 x 2048 tokens
(benchmarks/train.py --gpu's case). Kernel counts per step say whether a program is launch-bound (many
small kernels) or bound by bandwidth or FLOPs (a few large ones).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DECODE_TOKENS = 64


def device_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the trace's device processes (process names holding '/device:'; on a
    CPU, where there are none, every process's)."""
    paths = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz")) + sorted(
        pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not paths:
        raise SystemExit(f"no trace written under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name} or set(names)  # CPU: the host's lines
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices:
            out.append(dict(name=e.get("name", "?"), dur_us=float(e.get("dur", 0.0)),
                            line=threads.get((e["pid"], e.get("tid")), str(e.get("tid")))))
    return out


def summarize(events: list[dict], steps: int) -> dict:
    """Per trace line (streams, XLA op lines): event count and total time per step; the ten costliest
    names of the busiest line."""
    lines = collections.defaultdict(list)
    for e in events:
        lines[e["line"]].append(e)
    per_line = {line: dict(events_per_step=len(es) / steps, ms_per_step=sum(e["dur_us"] for e in es) / 1e3 / steps)
                for line, es in lines.items()}
    busiest = max(lines, key=lambda line: per_line[line]["ms_per_step"]) if lines else None
    by_name = collections.Counter()
    for e in lines.get(busiest, []):
        by_name[e["name"]] += e["dur_us"]
    top = [dict(name=name[:120], ms_per_step=us / 1e3 / steps) for name, us in by_name.most_common(10)]
    return dict(steps=steps, lines=per_line, busiest_line=busiest, top=top)


def traced(fn, label: str) -> list[dict]:
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            fn()
        events = device_events(tmp)
    print(f"{label}: {len(events)} device events", flush=True)
    return events


def decode_profiles() -> dict:
    import jax

    from agora_jax.models import create, tiny_tokenizer
    from agora_jax.sampling import Engine, SamplingParams
    from sampling import gpu_config

    engine = Engine(create(gpu_config(), seed=0), tiny_tokenizer(), max_batch=256)
    params = SamplingParams(max_new_tokens=DECODE_TOKENS, stop_token_ids=(), stop_strings=())
    out = {}
    for batch in (64, 256):
        prompts = [[5 + (i * 7 + j) % 250 for j in range(40)] for i in range(batch)]
        engine.generate(prompts, params)  # compile
        events = traced(lambda: jax.block_until_ready(engine.generate(prompts, params)), f"decode b{batch}")
        out[f"decode_b{batch}"] = summarize(events, DECODE_TOKENS)
    return out


def train_profile() -> dict:
    import jax

    from train import GPU_BATCH, GPU_LENGTH, gpu_config, token_batch
    from agora_jax.distill.data import DataConfig
    from agora_jax.distill.trainer import DistillConfig, Trainer
    from agora_jax.models import create

    cfg = DistillConfig(compute_dtype="bfloat16", loss_chunk=2048,
                        data=DataConfig(batch_size=GPU_BATCH, max_len=GPU_LENGTH), lora=None)
    trainer = Trainer(create(gpu_config(), seed=0), cfg, num_steps=1000)
    batch = token_batch(gpu_config().vocab_size, (GPU_BATCH, GPU_LENGTH))
    jax.block_until_ready(trainer.step(batch))  # compile
    return {"train_8x2048": summarize(traced(lambda: jax.block_until_ready(trainer.step(batch)), "train"), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="directory of profile.json")
    args = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, **decode_profiles(), **train_profile()}
    path = pathlib.Path(args.out) / "profile.json"
    path.write_text(json.dumps(result, indent=1))
    for case, summary in result.items():
        if not isinstance(summary, dict):
            continue
        print(f"\n{case} (per step; busiest line {summary['busiest_line']!r})")
        for line, stats in sorted(summary["lines"].items(), key=lambda kv: -kv[1]["ms_per_step"])[:6]:
            print(f"  {line[:60]:60s} {stats['events_per_step']:8.1f} events {stats['ms_per_step']:8.3f} ms")
        for row in summary["top"]:
            print(f"    {row['ms_per_step']:8.3f} ms  {row['name']}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
