"""The TPU compiler's own time estimate of a compiled program, loops counted by their trip counts.

XLA's `cost_analysis()` counts the body of every loop once (a 28-layer scan costs one layer) and its
`optimal_seconds` is negative for most of our programs, so neither gives a step time. The compiled
TPU program carries the compiler's per-instruction estimate (`"estimated_cycles"` in each backend
config); `program_cycles` adds them up, a counted loop (`lax.scan`: `i < N`) N times its body, a loop
whose end depends on data (the decode loop) once per iteration, reported separately. Asynchronous
collectives carry no estimate: the total is the compute the program issues, communication overlapped.
"""

from __future__ import annotations

import dataclasses
import re

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_CYCLES = re.compile(r'"estimated_cycles":"?(\d+)')
_CONSTANT = re.compile(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)")
_COUNTED = re.compile(r"ROOT %\S+ = pred\[\]\S* compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")


@dataclasses.dataclass(frozen=True)
class Cycles:
    """`total`: cycles of one call with every data-dependent loop run once; `per_iteration`: the body
    cycles of each such loop (the decode loop's segments), in program order."""

    total: int
    per_iteration: tuple[int, ...]


def computations(text: str) -> tuple[dict[str, list[str]], str]:
    """The HLO module's computations (name -> instruction lines) and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and line.startswith("  "):
            comps[current].append(line.strip())
    return comps, entry


def trip_count(condition: list[str]) -> int | None:
    """N for a loop condition `i < N` with N a constant (how jax lowers `scan` and `fori_loop`)."""
    constants = dict(m.groups() for m in map(_CONSTANT.search, condition) if m)
    root = next((m for m in map(_COUNTED.search, condition) if m), None)
    return int(constants[root.group(1)]) if root and root.group(1) in constants else None


def program_cycles(text: str) -> Cycles:
    """The compiler's cycle estimate of the compiled (optimised, partitioned) HLO module `text`."""
    comps, entry = computations(text)
    dynamic: list[int] = []

    def cost(name: str) -> int:
        total = 0
        for line in comps[name]:
            if " while(" in line:
                body = cost(re.search(r"body=%([\w.\-]+)", line).group(1))
                trips = trip_count(comps[re.search(r"condition=%([\w.\-]+)", line).group(1)])
                if trips is None:
                    dynamic.append(body)
                total += body * (1 if trips is None else trips)
            elif " conditional(" in line:
                branches = re.search(r"branch_computations=\{([^}]*)\}", line).group(1)
                total += max(cost(b.strip().lstrip("%")) for b in branches.split(","))
            elif " call(" in line:
                total += cost(re.search(r"to_apply=%([\w.\-]+)", line).group(1))
            elif match := _CYCLES.search(line):  # a fusion's estimate covers its fused computation
                total += int(match.group(1))
        return total

    return Cycles(cost(entry), tuple(dynamic))
