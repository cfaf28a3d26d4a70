"""Writing files so that a kill never leaves half of one: write a temporary sibling, then rename it over
the target (`os.replace` is atomic on POSIX). Every writer of results, transcripts, checkpoints and
exported models goes through `atomic_path`."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from typing import Iterator


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path` (`name.tmp`: no reader's pattern such as `*.safetensors`
    matches it) to write a file or a directory into; renamed to `path` when the block ends, removed if
    it raises. A leftover temporary from an earlier kill is removed first."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`path.write_text(text)` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
