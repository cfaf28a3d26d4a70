"""Where a stacked train step of 3 students spends its time against 3 single steps (CPU or accelerator).

    python benchmarks/train_profile.py [--small] [--steps N]

The case of `benchmarks/train.py`'s `train_stacked3_vs_seq` RATIO line: three SmolLM2-shaped students
(random init, full fine-tuning, batch 4 x 128 each; `--small`: the default pool's `small` preset,
16 x 48), trained by one `StackedTrainer` step against three `Trainer` steps on the same data. Both
sides are compiled, then N steps of each run under `jax.profiler.trace`; the trace's op events
(`gpu_profile.device_events`: on a CPU XLA's ops, on a GPU its kernels) are summed per step by kind
(the op name without its number: `dot`, `fusion`, `copy`, ...), so the table says which kinds of work
stacking makes cheaper or dearer. Prints wall ms per step of both sides too.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def kind(name: str) -> str:
    """An op event's kind: its name without the numeric suffix (`dot.12` -> `dot`)."""
    return re.sub(r"[._]\d+$", "", name.split(":")[0]).strip() or "?"


HLO_OP = re.compile(r"^[a-z][a-z0-9_\-]*([._]\d+)?$")  # XLA's op events (dot.3, ynn_fusion); not the host's


def by_kind(events: list[dict], steps: int, cpu: bool) -> dict[str, float]:
    """Milliseconds per step of each kind of op: on a CPU XLA's op events (the trace's other events,
    Python's and the runtime's, are left out), on an accelerator every device event (its kernels)."""
    totals = collections.Counter()
    for e in events:
        if not cpu or (e["line"] != "python" and HLO_OP.match(e["name"])):
            totals[kind(e["name"])] += e["dur_us"] / 1e3 / steps
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the default pool's small preset, 3 x 16 x 48")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    import jax

    from decode_profile import SMOLLM2
    from gpu_profile import traced
    from train import token_batch
    from agora_jax.distill.data import DataConfig
    from agora_jax.distill.stacked import StackedTrainer
    from agora_jax.distill.trainer import DistillConfig, Trainer
    from agora_jax.models import create, preset

    if args.small:
        config, batch, length = preset("small", vocab_size=264), 16, 48
    else:
        config, batch, length = preset("small", **SMOLLM2), 4, 128
    models = [create(config, seed=i) for i in range(3)]
    cfg = DistillConfig(data=DataConfig(batch_size=batch, max_len=length), lora=None)
    data = token_batch(config.vocab_size, (3, batch, length))
    singles = [Trainer(m, cfg.replace(seed=i), num_steps=1000) for i, m in enumerate(models)]
    stacked = StackedTrainer(models, cfg, 1000)

    def sequential():
        for i, t in enumerate(singles):
            jax.block_until_ready(t.step({k: v[i] for k, v in data.items()}))

    def together():
        jax.block_until_ready(stacked.step(data))

    sides = {}
    for name, fn in (("sequential (3 steps)", sequential), ("stacked (1 step)", together)):
        fn()  # compile
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        wall = (time.perf_counter() - start) * 1e3 / args.steps
        events = traced(lambda: [fn() for _ in range(args.steps)], name)
        sides[name] = (wall, by_kind(events, args.steps, jax.devices()[0].platform == "cpu"))
    kinds = sorted({k for _, t in sides.values() for k in t}, key=lambda k: -max(t.get(k, 0) for _, t in sides.values()))
    names = list(sides)
    print(f"\n3 students, {batch} x {length} each, {'small preset' if args.small else 'SmolLM2-shaped'}; "
          f"{jax.devices()[0].platform}, {args.steps} steps per side")
    print(f"| op kind (ms per step, summed over threads or streams) | {' | '.join(names)} |")
    print("|---|" + "---|" * len(names))
    for k in kinds[:14]:
        print(f"| {k} | " + " | ".join(f"{sides[n][1].get(k, 0.0):.1f}" for n in names) + " |")
    print("| all XLA ops | " + " | ".join(f"{sum(sides[n][1].values()):.1f}" for n in names) + " |")
    print("| wall | " + " | ".join(f"{sides[n][0]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
