"""Document sources: every input kind yields documents, as text or as already-tokenized ids.

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

import numpy as np

from kdscale.errors import KDScaleError

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


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise KDScaleError(f"data.inputs: cannot read {str(path)!r}: {exc.strerror}") from None


def _jsonl_docs(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise KDScaleError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KDScaleError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise KDScaleError(
                    f"{path}:{lineno}: record has no field {field!r} (set data.text_field)"
                )
            if not isinstance(record[field], str):
                raise KDScaleError(f"{path}:{lineno}: field {field!r} is not a string")
            yield record[field]


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
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
    for batch in parquet.iter_batches(columns=[field]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _megatron_docs(prefix: Path) -> Iterator[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        dataset = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    except Exception as exc:  # megatron raises assorted errors for damaged .idx files
        raise KDScaleError(f"{prefix}.bin/.idx: not a readable Megatron indexed dataset ({exc})") from None
    bounds = dataset.document_indices
    for doc in range(len(bounds) - 1):
        parts = [dataset[i] for i in range(bounds[doc], bounds[doc + 1])]
        if parts:
            yield np.concatenate(parts).astype(np.int64, copy=False)


def iter_documents(source: Source, text_field: str) -> Iterator[str | np.ndarray]:
    """Yield the documents of one source: ``str`` for text, int64 ids for tokenized inputs."""
    if source.kind in ("text", "stdlib"):
        for path in source.files:
            yield _read_text(path)
    elif source.kind == "jsonl":
        yield from _jsonl_docs(source.files[0], text_field)
    elif source.kind == "parquet":
        yield from _parquet_docs(source.files[0], text_field)
    elif source.kind == "megatron":
        yield from _megatron_docs(source.files[0])
    else:  # pragma: no cover - resolve_source produces only the kinds above
        raise AssertionError(source.kind)
