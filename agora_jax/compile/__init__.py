"""Ahead-of-time compilation of a run's programs for a TPU topology, on a CPU-only host.

    report = compile_run(config, "v5e:2x4", pathlib.Path("workdir/compile"))

builds every program `launch/main.py` would run with `config` (`programs.run_programs`: generation,
scoring, distillation) on abstract models of the pool's real shapes (`agora_jax.models.shapes`), for
the topology's devices (`chips.topology`, needs libtpu) and the config's mesh, and compiles them:
`report.analyze` gives each one's per-device memory against the chip's HBM and the compiler's time
estimate. A program that cannot fit raises `DoesNotFit` naming it, the shortfall and the mesh: from
its shapes alone before anything is compiled, else as soon as its compiled size is known (programs are
compiled largest first).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import pathlib
import time
from typing import Callable

import jax
import ml_collections

from agora_jax.compile.chips import CHIPS, GIB, Topology, TopologyError, topology
from agora_jax.compile.programs import Buckets, Program, fits_in, run_programs
from agora_jax.compile.report import Result, analyze, table, write
from agora_jax.evolution.config import ConfigError
from agora_jax.models import make_mesh
from agora_jax.sampling.engine import BATCH_AXES, bucket

log = logging.getLogger(__name__)


class DoesNotFit(ValueError):
    """A program needs more memory per device than the chip has."""


@dataclasses.dataclass
class Report:
    header: dict
    results: list[Result]
    markdown: str


def run_mesh(config: ml_collections.ConfigDict, topo: Topology):
    """The config's (data, fsdp, tensor) mesh on the topology's devices; a mesh of fewer devices than
    the slice (no -1 entry) takes its first ones."""
    shape = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    wanted = len(topo.devices) if -1 in shape else math.prod(shape)
    if wanted > len(topo.devices):
        raise ConfigError(f"config.mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs {wanted} devices; "
                          f"{topo.name} has {len(topo.devices)}")
    try:
        return make_mesh(*shape, devices=topo.devices[:wanted])
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def describe(mesh) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.size} device{'s' * (mesh.size > 1)})"


def _shortfall(program: Program | str, needed: int, topo: Topology, mesh, how: str) -> DoesNotFit:
    name = program if isinstance(program, str) else program.name
    return DoesNotFit(f"{name} needs {needed / GIB:.2f} GiB per device ({how}) of the {topo.hbm_bytes / GIB:.0f} GiB "
                      f"a {topo.chip.name} device has: {(needed - topo.hbm_bytes) / GIB:.2f} GiB short on mesh "
                      f"{describe(mesh)} of {topo.name}")


def _refused(program: Program, message: str, topo: Topology, mesh) -> DoesNotFit:
    """The compiler's out-of-memory refusal (RESOURCE_EXHAUSTED) as a `DoesNotFit`, with its numbers."""
    found = re.search(r"required for ([\w ]+) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
    if found is None:
        return DoesNotFit(f"{program.name} does not fit on mesh {describe(mesh)} of {topo.name}: "
                          f"{message.splitlines()[0]}")
    what, needed, available = found.group(1), float(found.group(2)), float(found.group(3))
    return DoesNotFit(f"{program.name} needs {needed:.2f} GiB per device for its {what} (compiled) of the "
                      f"{available:.2f} GiB the compiler can use on a {topo.chip.name} device: "
                      f"{needed - available:.2f} GiB short on mesh {describe(mesh)} of {topo.name}")


def run_buckets(config: ml_collections.ConfigDict, mesh, rows: int | None, prompt_len: int) -> Buckets:
    """The engine shapes the run samples with: `rows` per member per call (default the config's
    `engine.max_batch`, at least one per batch device), as the engine pads them to powers of two."""
    batch_devices = math.prod(mesh.shape[a] for a in BATCH_AXES)
    budget = config.strategy.get("sampling", {}).get("max_new_tokens", config.evaluation.max_new_tokens)
    rows = config.engine.max_batch if rows is None else rows
    return Buckets(rows=bucket(rows, batch_devices), prompt_len=bucket(prompt_len, 16), max_new=bucket(budget, 16))


def compile_run(config: ml_collections.ConfigDict, topology_name: str, workdir: pathlib.Path, *, rows: int | None = None,
                prompt_len: int = 1024, only: str = "", progress: Callable[[str], None] = log.info) -> Report:
    """Compile every program of a run of `config` for `topology_name` (see the module docstring) and
    write the reports into `workdir`. `rows`: the engine's rows per member per call (its `max_batch`;
    default `config.engine.max_batch`),
    `prompt_len`: the longest prompt; `only`: compile just the programs whose name contains it."""
    topo = topology(topology_name)
    mesh = run_mesh(config, topo)
    buckets = run_buckets(config, mesh, rows, prompt_len)
    programs = [p for p in run_programs(config, mesh, buckets) if only in p.name]
    if not programs:
        raise ConfigError(f"no program of this run matches --only={only!r}")
    too_big = fits_in(programs, mesh.size, topo.hbm_bytes)
    if too_big:
        program, _ = max(too_big, key=lambda pair: pair[1])
        raise _shortfall(program, program.floor(mesh.size), topo, mesh, "its arguments and outputs alone")
    results = []
    for program in sorted(programs, key=lambda p: -p.floor(mesh.size)):
        start = time.perf_counter()
        try:
            with jax.set_mesh(mesh):  # the model splits its activations over the batch axes (`_batch_split`)
                compiled = program.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise _refused(program, str(e), topo, mesh) from None  # the compiler refuses a program over the HBM
        result = analyze(program, compiled, topo, mesh.size, time.perf_counter() - start)
        progress(f"{program.name}: {result.memory['total'] / GIB:.2f} GiB per device, compiled in "
                 f"{result.compile_seconds:.0f} s")
        if not result.fits:
            raise _shortfall(program, result.memory["total"], topo, mesh, "compiled")
        results.append(result)
    header = dict(config=f"{config.strategy.name}:{config.variant}", topology=topo.name, chip=topo.chip.name,
                  hosts=topo.hosts, devices=len(topo.devices), mesh=describe(mesh),
                  hbm_per_device_gib=round(topo.hbm_bytes / GIB, 2), buckets=dataclasses.asdict(buckets),
                  models=list(dict.fromkeys(m for p in programs for m in p.models)))
    return Report(header, results, write(header, results, topo, workdir))


__all__ = ["CHIPS", "DoesNotFit", "Report", "TopologyError", "compile_run", "run_buckets", "run_mesh", "table", "topology"]
