"""TPU chips and topologies to compile for, without the TPUs.

`topology("v5e:2x4")` asks libtpu for the devices of that slice (`jax.experimental.topologies`):
abstract TPU devices a `Mesh` can be built from and programs compiled for on a CPU-only host. It needs
the `libtpu` package (`pip install -e ".[tpu]"`); the process's own backend stays what it was (run
with `JAX_PLATFORMS=cpu` so nothing else touches libtpu).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

GIB = 1 << 30


class TopologyError(ValueError):
    """A topology that cannot be built here (bad name, unknown chip, libtpu missing)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip as published: HBM capacity (bytes), HBM bandwidth (bytes/s), dense bf16 FLOP/s."""

    name: str
    hbm_bytes: int
    hbm_bandwidth: float
    bf16_flops: float


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 1228e9, 275e12),
    "v5e": Chip("v5e", 16 * GIB, 819e9, 197e12),
    "v5p": Chip("v5p", 95 * GIB, 2765e9, 459e12),
    "v6e": Chip("v6e", 32 * GIB, 1640e9, 918e12),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its devices (one per TensorCore that jax sees: two per v4 chip, one on the others),
    the chip they sit on, and the hosts they belong to."""

    name: str
    chip: Chip
    devices: tuple[Any, ...]

    @property
    def devices_per_chip(self) -> int:
        chips = {tuple(d.coords) for d in self.devices}
        return len(self.devices) // len(chips)

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def hbm_bytes(self) -> int:
        """HBM of one device."""
        return self.chip.hbm_bytes // self.devices_per_chip

    @property
    def hbm_bandwidth(self) -> float:
        return self.chip.hbm_bandwidth / self.devices_per_chip

    @property
    def bf16_flops(self) -> float:
        return self.chip.bf16_flops / self.devices_per_chip


def topology(name: str) -> Topology:
    """The TPU slice `name` ("v5e:2x2", "v5e:4x4", "v4:2x2x4", ...: chip, then the chip grid)."""
    chip_name = name.split(":")[0]
    if chip_name not in CHIPS or ":" not in name:
        raise TopologyError(f"--topology={name!r}: expected CHIP:GRID with CHIP one of {', '.join(CHIPS)} "
                            f"(e.g. v5e:2x2, v5e:2x4, v4:2x2x4)")
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("compiling for TPU needs libtpu: pip install -e '.[tpu]' (the jax[tpu] extra)")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: other processes may load it too
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu rejects the grid (v5e:1x1 is not a slice)
        raise TopologyError(f"--topology={name!r}: libtpu cannot build it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from e
    return Topology(name, CHIPS[chip_name], tuple(desc.devices))
