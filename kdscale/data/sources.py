"""Document sources: every input kind yields documents, as text or as already-tokenized ids.

Each reader streams one slice of an input (a byte range, row groups, a document range), so that
:mod:`kdscale.data.units` can cut large inputs into work units read in bounded memory.

Inputs, in the order given (directories are walked in sorted order, so runs are repeatable):

- ``*.txt`` files, or directories of them: one document per file;
- ``*.jsonl``: one document per line, text in ``data.text_field``;
- ``*.parquet``: one document per row of column ``data.text_field``;
- a Megatron indexed dataset (``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``): already tokenized,
  one document per entry of its document index;
- ``stdlib:python`` (or ``stdlib:python/json`` for one package): the ``.py`` sources of the running
  interpreter's standard library, a real corpus every machine has.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdscale.errors import KDScaleError

if TYPE_CHECKING:
    import pyarrow.parquet as pq
    from megatron.core.datasets.indexed_dataset import IndexedDataset

STDLIB_PREFIX = "stdlib:python"


@dataclass(frozen=True)
class Source:
    """One resolved input: its kind and the files behind it."""

    kind: str  # "text" | "jsonl" | "parquet" | "megatron" | "stdlib"
    spec: str
    files: tuple[Path, ...]


def _stdlib_files(spec: str) -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    sub = spec[len(STDLIB_PREFIX):].lstrip("/")
    base = root / sub if sub else root
    if not base.exists():
        raise KDScaleError(f"data.inputs: {spec!r}: the standard library has no {sub!r}")
    files = [base] if base.is_file() else sorted(base.rglob("*.py"))
    return tuple(f for f in files if "site-packages" not in f.relative_to(root).parts)


def _megatron_prefix(path: Path) -> Path | None:
    prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
    if prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file():
        return prefix
    return None


def resolve_source(spec: str) -> Source:
    """Check that ``spec`` exists and say what kind of input it is (cheap: no reading)."""
    if spec.startswith(STDLIB_PREFIX):
        return Source("stdlib", spec, _stdlib_files(spec))
    path = Path(spec).expanduser()
    prefix = _megatron_prefix(path)
    if prefix is not None:
        return Source("megatron", spec, (prefix,))
    if not path.exists():
        raise KDScaleError(f"data.inputs: {spec!r} does not exist")
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        if not files:
            raise KDScaleError(f"data.inputs: directory {spec!r} holds no .txt files")
        return Source("text", spec, files)
    kinds = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
    if path.suffix in kinds:
        return Source(kinds[path.suffix], spec, (path,))
    raise KDScaleError(
        f"data.inputs: {spec!r}: unsupported input (expected .txt, .jsonl, .parquet, a Megatron "
        f".bin/.idx prefix, a directory of .txt files, or {STDLIB_PREFIX}[/package])"
    )


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise KDScaleError(f"data.inputs: cannot read {str(path)!r}: {exc.strerror}") from None


def _line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line that starts at byte ``offset`` (error messages only)."""
    with open(path, "rb") as handle:
        return handle.read(offset).count(b"\n") + 1


def jsonl_documents(path: Path, field: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The texts of the lines that start in bytes ``[start, end)`` of a .jsonl file, streamed."""
    with open(path, "rb") as handle:
        if start:
            handle.seek(start - 1)
            handle.readline()  # the line holding byte start-1 belongs to the range before
        while end is None or handle.tell() < end:
            offset = handle.tell()
            raw = handle.readline()
            if not raw:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                where = f"{path}:{_line_number(path, offset)}"
                raise KDScaleError(f"{where}: not UTF-8 text (byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                where = f"{path}:{_line_number(path, offset)}"
                raise KDScaleError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(record, dict) or field not in record:
                where = f"{path}:{_line_number(path, offset)}"
                raise KDScaleError(f"{where}: record has no field {field!r} (set data.text_field)")
            if not isinstance(record[field], str):
                raise KDScaleError(f"{path}:{_line_number(path, offset)}: field {field!r} is not a string")
            yield record[field]


def open_parquet(path: Path, field: str) -> "pq.ParquetFile":
    """A parquet file whose column ``field`` holds strings (checked from its schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise KDScaleError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if field not in names:
        raise KDScaleError(f"{path}: no column {field!r} (columns: {', '.join(names)}; set data.text_field)")
    column_type = parquet.schema_arrow.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise KDScaleError(f"{path}: column {field!r} has type {column_type}, expected a string column")
    return parquet


def parquet_documents(path: Path, field: str, row_groups: list[int]) -> Iterator[str]:
    """The non-null texts of column ``field`` in the given row groups, a batch at a time."""
    parquet = open_parquet(path, field)
    for batch in parquet.iter_batches(columns=[field], row_groups=row_groups, batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def open_megatron(prefix: Path) -> "IndexedDataset":
    """A Megatron indexed dataset (memory-mapped), or a clear error."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        return IndexedDataset(str(prefix), multimodal=False, mmap=True)
    except Exception as exc:  # megatron raises assorted errors for damaged .idx files
        raise KDScaleError(f"{prefix}.bin/.idx: not a readable Megatron indexed dataset ({exc})") from None


def megatron_documents(prefix: Path, first: int, last: int) -> Iterator[np.ndarray]:
    """Documents ``first .. last - 1`` of a Megatron indexed dataset, as int64 ids."""
    dataset = open_megatron(prefix)
    bounds = dataset.document_indices
    for doc in range(first, last):
        parts = [dataset[i] for i in range(bounds[doc], bounds[doc + 1])]
        if parts:
            yield np.concatenate(parts).astype(np.int64, copy=False)
