"""What a compiled program needs and how fast the compiler expects it to run, per device.

`analyze(program, compiled, topology)` reads the compiler's memory analysis (arguments, outputs,
temporaries, code; the fit check against the chip's HBM), its loop-aware cycle estimate
(`hlo.program_cycles`, turned into seconds by `seconds_per_cycle`), and the arrays the program holds
fully replicated on a multi-device mesh. From those: decode tokens/s and the share of the HBM roofline
a decode step reaches (its weights and cache read once at the chip's bandwidth, over the estimated
step), and a train step's model FLOPs utilisation. `write(report, workdir)` writes
compile_report.json and compile_report.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from agora_jax.compile.chips import GIB, Topology
from agora_jax.compile.hlo import computations, program_cycles
from agora_jax.compile.programs import Program

REPLICATED_MIN_BYTES = 1 << 20  # smaller arrays (norms, biases, scalars) are replicated by design


@dataclasses.dataclass
class Result:
    """One program's per-device needs and the compiler's estimates (None where they do not apply)."""

    name: str
    kind: str
    models: list[str]
    memory: dict[str, int]  # arguments, outputs, aliased, temporaries, code, total
    fits: bool
    seconds: float  # one call (decode: the whole generation budget)
    step_seconds: float | None  # decode: one token step at the full cache window
    tokens_per_second: float | None
    hbm_roofline: float | None  # decode: share of the HBM roofline
    mfu: float | None  # training: model FLOPs utilisation
    model_flops: float
    xla_cost: dict[str, float]  # cost_analysis() as reported: loop bodies counted once
    replicated: list[str]
    compile_seconds: float


@functools.lru_cache(maxsize=None)
def seconds_per_cycle(topology: Topology) -> float:
    """The compiler's cycle length on this chip: a large bf16 matmul, whose cycle estimate XLA's own
    roofline (`optimal_seconds`) puts at the chip's peak FLOP rate."""
    mesh = Mesh(np.asarray(topology.devices[:1]), ("x",))
    x = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(jnp.matmul).lower(x, x).compile()
    return compiled.cost_analysis()["optimal_seconds"] / program_cycles(compiled.as_text()).total


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Per-device bytes: what the program keeps live at its peak (arguments and outputs, donated
    arguments once, temporaries, code)."""
    m = compiled.memory_analysis()
    out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out


def replicated_arrays(compiled: jax.stages.Compiled, min_bytes: int = REPLICATED_MIN_BYTES) -> list[str]:
    """Inputs and outputs of at least `min_bytes` the compiled program holds whole on every device."""
    found = []
    for where, shapes, shardings in (("in", compiled.args_info, compiled.input_shardings),
                                     ("out", compiled.out_info, compiled.output_shardings)):
        leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
        for (path, shape), sharding in zip(leaves, jax.tree.leaves(shardings)):
            shape = getattr(shape, "_aval", shape)
            size = math.prod(shape.shape) * shape.dtype.itemsize
            if size >= min_bytes and len(sharding.device_set) > 1 and sharding.is_fully_replicated:
                found.append(f"{where}{jax.tree_util.keystr(path)} {shape.dtype}{list(shape.shape)}")
    return found


def analyze(program: Program, compiled: jax.stages.Compiled, topology: Topology, devices: int,
            compile_seconds: float) -> Result:
    """`program`'s needs and estimates on `devices` devices of `topology` (see the module docstring)."""
    mem = memory(compiled)
    cycles = program_cycles(compiled.as_text())
    cycle = seconds_per_cycle(topology)
    step = max(cycles.per_iteration) * cycle if program.kind == "decode" and cycles.per_iteration else None
    # decode: the loop once per token of the budget, at the cost of its widest (last) segment
    seconds = cycle * cycles.total
    if step is not None:
        seconds += program.steps * step - cycle * sum(cycles.per_iteration)
    per_call = step or seconds
    cost = compiled.cost_analysis()
    return Result(
        name=program.name, kind=program.kind, models=list(program.models), memory=mem,
        fits=mem["total"] <= topology.hbm_bytes, seconds=seconds, step_seconds=step,
        tokens_per_second=program.tokens / per_call if program.kind in ("decode", "prefill") else None,
        hbm_roofline=mem["arguments"] / topology.hbm_bandwidth / step if step else None,
        mfu=(program.model_flops / devices / topology.bf16_flops / seconds
             if program.kind in ("train", "onpolicy") else None),
        model_flops=program.model_flops,
        xla_cost={k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds") if k in cost},
        replicated=replicated_arrays(compiled), compile_seconds=compile_seconds)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def table(results: Sequence[Result], topology: Topology) -> str:
    """The markdown table of `results`."""
    lines = [f"| program | models | args / out / temp / code GiB | total GiB (of {_gib(topology.hbm_bytes)}) | fits "
             f"| est. time | tokens/s | HBM roofline | MFU | replicated |", "|" + "---|" * 10]
    for r in results:
        m = r.memory
        time = (f"{r.step_seconds * 1e3:.2f} ms/token" if r.step_seconds else f"{r.seconds * 1e3:.1f} ms")
        rate = "" if r.tokens_per_second is None else f"{r.tokens_per_second:,.0f}"
        lines.append(f"| {r.name} | {', '.join(r.models)} | {_gib(m['arguments'])} / {_gib(m['outputs'])} / "
                     f"{_gib(m['temporaries'])} / {_gib(m['code'])} | {_gib(m['total'])} | "
                     f"{'yes' if r.fits else '**no**'} | {time} | {rate} | {_pct(r.hbm_roofline)} | {_pct(r.mfu)} | "
                     f"{len(r.replicated) or ''} |")
    return "\n".join(lines)


def write(header: dict[str, Any], results: Sequence[Result], topology: Topology, workdir: pathlib.Path) -> str:
    """compile_report.json and compile_report.md in `workdir`; returns the markdown."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "compile_report.json").write_text(json.dumps(
        {**header, "programs": [dataclasses.asdict(r) for r in results]}, indent=1))
    replicated = [f"- {r.name}: {a}" for r in results for a in r.replicated]
    text = "\n".join([
        f"# Compile report: {header['config']} on {header['topology']}", "",
        *(f"- {k}: {v}" for k, v in header.items() if k not in ("config", "topology")), "",
        table(results, topology), "",
        "Per device. est. time: the TPU compiler's cycle estimate (loops by their trip counts; decode: one token "
        "step at the full cache window, compute only, collectives overlapped). HBM roofline: the decode step's "
        "arguments (weights and cache) read once at the chip's bandwidth, over that estimate. MFU: model FLOPs "
        "(forward x3, LoRA x2, + KD teachers' forward) over the estimate at peak bf16.", "",
        "Fully replicated arrays of 1 MiB or more:" if replicated else "No array of 1 MiB or more is fully replicated.",
        *replicated, ""])
    (workdir / "compile_report.md").write_text(text)
    return text


__all__ = ["Result", "analyze", "computations", "memory", "replicated_arrays", "seconds_per_cycle", "table", "write"]
