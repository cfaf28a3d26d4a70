"""Where task records come from: local JSON/JSONL/CSV/parquet files under the data root, HF
`datasets.load_dataset` (hub ids, or local files via the 'json'/'csv'/'parquet' builders), and TFDS
(`tfds.data_source` with a data_dir). Every record carries its location ("file:line") so that bad
data is reported where it is.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import agora_jax

DATA_ENV = "AGORA_JAX_DATA"
_LOCAL_BUILDERS = ("json", "csv", "parquet")


class TaskDataError(ValueError):
    """Bad task data; the message names the file (or dataset) and the line (or row)."""


class Row(NamedTuple):
    where: str  # "path/to/file.jsonl:12", "openai/gsm8k[test] row 3", ...
    record: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Source:
    """One table of records.

    kind="file": `path` is a .jsonl/.json/.csv/.parquet file, relative to the data root or absolute.
    kind="hf":   `path` is a hub id (with `config`) or a builder ('json', ...) with `data_files`
                 relative to the data root.
    kind="tfds": `path` is a TFDS dataset name, read from the data root as data_dir.
    `fallback` is read instead when a local file is missing (e.g. the hub copy of a benchmark).
    """

    path: str
    kind: str = "file"
    split: str = "train"
    config: str | None = None
    data_files: str | None = None
    records_key: str | None = None  # JSON file holding {records_key: [...]} (BBH: "examples")
    fallback: Source | None = None


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The data directory: argument, else $AGORA_JAX_DATA, else ../shared/data next to the repo."""
    if override is not None:
        return Path(override)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return (Path(agora_jax.__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def load_rows(source: Source, root: Path) -> list[Row]:
    """All records of `source`, each with its location; raises TaskDataError on bad data."""
    if source.kind == "file":
        path = Path(source.path) if Path(source.path).is_absolute() else root / source.path
        if not path.exists() and source.fallback is not None:
            try:
                return load_rows(source.fallback, root)
            except (OSError, ValueError) as e:  # no hub here, or no copy there: name the local file too
                raise TaskDataError(f"{path}: no such file, and its fallback {source.fallback.path!r} failed "
                                    f"({type(e).__name__}: {e})") from e
        rows = _read_file(path, source.records_key)
        where = str(path)
    elif source.kind == "hf":
        rows, where = _read_hf(source, root)
    elif source.kind == "tfds":
        rows, where = _read_tfds(source, root)
    else:
        raise ValueError(f"unknown source kind {source.kind!r}; expected file, hf or tfds")
    if not rows:
        raise TaskDataError(f"{where}: no records")
    return rows


def _read_file(path: Path, records_key: str | None) -> list[Row]:
    if not path.exists():
        raise TaskDataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path, records_key)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [Row(f"{path}:{reader.line_num}", dict(r)) for r in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [Row(f"{path}: row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise TaskDataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .parquet)")


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{line_no}: malformed JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise TaskDataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            rows.append(Row(f"{path}:{line_no}", record))
    return rows


def _read_json(path: Path, records_key: str | None) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if records_key is not None:
        if not isinstance(data, dict) or records_key not in data:
            raise TaskDataError(f"{path}: missing key {records_key!r} holding the records")
        data = data[records_key]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise TaskDataError(f"{path}: expected a list of JSON objects")
    return [Row(f"{path}: record {i}", r) for i, r in enumerate(data)]


def _read_hf(source: Source, root: Path) -> tuple[list[Row], str]:
    datasets = _optional_import("datasets", f"source kind 'hf' ({source.path})")
    data_files = source.data_files
    if source.path in _LOCAL_BUILDERS and data_files is not None and "://" not in data_files:
        data_files = str(root / data_files)  # an absolute path stays as it is
    where = f"{data_files or source.path}[{source.split}]"
    try:
        table = datasets.load_dataset(source.path, source.config, split=source.split, data_files=data_files)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        raise TaskDataError(f"{where}: cannot load ({e})") from e
    return [Row(f"{where} row {i}", r) for i, r in enumerate(table)], where


def _read_tfds(source: Source, root: Path) -> tuple[list[Row], str]:
    tfds = _optional_import("tensorflow_datasets", f"source kind 'tfds' ({source.path})")
    where = f"tfds:{source.path}[{source.split}]"
    table = tfds.data_source(source.path, split=source.split, data_dir=str(root))
    return [Row(f"{where} row {i}", _plain(table[i])) for i in range(len(table))], where


def _optional_import(module: str, needed_for: str) -> Any:
    """`module`, or a TaskDataError saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.replace("_", "-")
        raise TaskDataError(f"{needed_for} needs the {package!r} package, which is not importable ({e}); "
                            f"pip install {package}") from e


def _plain(value: Any) -> Any:
    """TFDS features (bytes, numpy scalars and arrays) as plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
