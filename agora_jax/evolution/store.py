"""Everything a run keeps in its workdir, written so that a kill at any moment loses at most the
unit in progress and never corrupts what was completed.

- `config.json`: the run's config; a rerun with an incompatible config is refused.
- `generations/<r>/`: one Orbax checkpoint per generation: every member's weights, the
  collaborative outputs, the distillation data, the metrics so far and the RNG seeds.
- `rounds/<r>/*.json`, `rounds/<r>/members/<name>/`: the completed units of the round in progress
  (collaboration outputs, each member's distilled weights); the resume point within a round.
- `transcripts/round<r>_<split>.jsonl`: every message of a collaboration. Round r's dev transcript is
  part of its stored collaboration: written before `rounds/<r>/collaboration.json` marks the unit
  done, and read back with it, so a resumed round filters and distills exactly what the fresh one did.
- `strategy/<name>/`: what strategies fit or remember (AGORA's shared memory, whose entries carry
  their generation, so a re-run generation starts from the memory of the ones before it).
Orbax writes each checkpoint to a temporary directory and renames it when complete; JSON and JSONL
files are written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from agora_jax.evolution.config import RESUMABLE_KEYS, current_names
from agora_jax.atomic import atomic_write_text

Params = dict[str, Any]  # member name -> pure dict of its parameters


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run made with a different config."""


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class RunStore:
    def __init__(self, workdir: str | os.PathLike, max_to_keep: int | None = None):
        self.workdir = pathlib.Path(workdir).absolute()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            probe = self.workdir / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise PermissionError(f"--workdir={self.workdir} is not writable ({e.strerror})") from None
        self._generations = ocp.CheckpointManager(
            self.workdir / "generations",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    # ------------------------------------------------------------------ config

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Record the config on first use; refuse a different one later (except `RESUMABLE_KEYS`)."""
        path = self.workdir / "config.json"
        current = json.loads(config.to_json())
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise IncompatibleWorkdirError(f"{path}: corrupt ({e}); use a fresh --workdir") from None
            old, new = _flatten(current_names(saved)), _flatten(current)
            differing = sorted((k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS),
                               key=lambda k: (k not in old or k not in new, k))  # changed values first
            if differing:
                shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing[:3])
                raise IncompatibleWorkdirError(
                    f"{self.workdir} holds a run with a different config: {len(differing)} settings differ "
                    f"({', '.join(differing[:20])}; e.g. {shown}); use a fresh --workdir")
        atomic_write_text(path, json.dumps(current, indent=2))

    # ------------------------------------------------------------------ units of the round in progress

    def _unit(self, round_: int, name: str) -> pathlib.Path:
        return self.workdir / "rounds" / str(round_) / name

    def save_unit(self, round_: int, name: str, payload: Any) -> None:
        path = self._unit(round_, f"{name}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(payload))

    def load_unit(self, round_: int, name: str) -> Any | None:
        path = self._unit(round_, f"{name}.json")
        return json.loads(path.read_text()) if path.exists() else None

    def save_member(self, round_: int, name: str, params: dict) -> None:
        path = self._unit(round_, f"members/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, params, force=True)

    def load_member(self, round_: int, name: str, like: dict) -> dict | None:
        path = self._unit(round_, f"members/{name}")
        if not path.exists():
            return None
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, _abstract(like))

    # ------------------------------------------------------------------ generations

    def latest_generation(self) -> int | None:
        return self._generations.latest_step()

    def save_generation(self, round_: int, params: Params, meta: dict[str, Any]) -> None:
        """Checkpoint generation `round_` and drop that round's unit files."""
        self._generations.save(round_, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        self._generations.wait_until_finished()
        shutil.rmtree(self.workdir / "rounds" / str(round_), ignore_errors=True)

    def restore_generation(self, round_: int, like: Params) -> tuple[Params, dict[str, Any]]:
        try:
            out = self._generations.restore(round_, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises several types for damaged checkpoints
            raise IOError(f"{self.workdir / 'generations' / str(round_)}: cannot restore generation "
                          f"checkpoint ({type(e).__name__}: {e})") from e
        return out.params, out.meta

    def close(self) -> None:
        self._generations.close()
