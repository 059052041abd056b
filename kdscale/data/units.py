"""Work units: the inputs cut into deterministic slices that workers tokenize independently.

    units = plan_units(sources, text_field, unit_bytes)
    for doc in unit_documents(units[7], text_field): ...

Units follow the input order, and their documents, concatenated in unit order, are exactly the
documents of the inputs in order: the cut changes only who tokenizes what, never the output.
The cut depends only on the inputs and ``unit_bytes``:

- ``.txt`` files and ``stdlib:`` sources: runs of consecutive files of about ``unit_bytes``;
- ``.jsonl``: byte ranges of ``unit_bytes``; a unit owns the lines that start inside its range;
- ``.parquet``: runs of consecutive row groups of about ``unit_bytes`` (uncompressed);
- Megatron indexed datasets: runs of consecutive documents of about ``unit_bytes`` of ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdscale.data.sources import (
    Source,
    jsonl_documents,
    megatron_documents,
    open_megatron,
    open_parquet,
    parquet_documents,
    read_text,
)


@dataclass(frozen=True)
class Unit:
    """One slice of one input: ``files`` (several for text), and ``[start, end)`` — bytes of a
    .jsonl, row groups of a .parquet, documents of a Megatron dataset. ``split`` is ``"eval"``
    for held-out inputs, else None (documents are split by hash)."""

    kind: str
    files: tuple[str, ...]
    start: int = 0
    end: int = 0
    split: str | None = None


def _runs(sizes: list[int], unit_bytes: int) -> list[tuple[int, int]]:
    """Cut items of the given sizes into consecutive runs ``[first, last)`` of about
    ``unit_bytes`` each (at least one item per run)."""
    runs, first, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= unit_bytes:
            runs.append((first, i + 1))
            first, total = i + 1, 0
    if first < len(sizes):
        runs.append((first, len(sizes)))
    return runs


def _source_units(source: Source, split: str | None, text_field: str, unit_bytes: int) -> list[Unit]:
    if source.kind in ("text", "stdlib"):
        files = [str(f) for f in source.files]
        sizes = [f.stat().st_size for f in source.files]
        return [Unit(source.kind, tuple(files[a:b]), split=split) for a, b in _runs(sizes, unit_bytes)]
    path = source.files[0]
    if source.kind == "jsonl":
        size = path.stat().st_size
        starts = range(0, max(size, 1), unit_bytes)
        return [Unit("jsonl", (str(path),), s, min(s + unit_bytes, size), split) for s in starts]
    if source.kind == "parquet":
        metadata = open_parquet(path, text_field).metadata
        sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
        return [Unit("parquet", (str(path),), a, b, split) for a, b in _runs(sizes, unit_bytes)]
    if source.kind == "megatron":
        dataset = open_megatron(path)
        bounds = np.asarray(dataset.document_indices, dtype=np.int64)
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        ends = np.concatenate([[0], np.cumsum(lengths)])[bounds] * dataset.index.dtype_size
        sizes = np.diff(ends).tolist()
        return [Unit("megatron", (str(path),), a, b, split) for a, b in _runs(sizes, unit_bytes)]
    raise AssertionError(source.kind)  # resolve_source produces only the kinds above


def plan_units(
    sources: list[tuple[Source, str | None]], text_field: str, unit_bytes: int
) -> list[Unit]:
    """Every input's units, in input order (cheap: sizes and metadata only; a parquet column or
    a Megatron index that cannot be read is refused here, before any work)."""
    return [u for source, split in sources for u in _source_units(source, split, text_field, unit_bytes)]


def unit_documents(unit: Unit, text_field: str) -> Iterator[str | np.ndarray]:
    """The documents of one unit: ``str`` for text, int64 ids for tokenized inputs."""
    if unit.kind in ("text", "stdlib"):
        for path in unit.files:
            yield read_text(Path(path))
    elif unit.kind == "jsonl":
        yield from jsonl_documents(Path(unit.files[0]), text_field, unit.start, unit.end)
    elif unit.kind == "parquet":
        yield from parquet_documents(Path(unit.files[0]), text_field, list(range(unit.start, unit.end)))
    elif unit.kind == "megatron":
        yield from megatron_documents(Path(unit.files[0]), unit.start, unit.end)
    else:  # pragma: no cover - plan_units produces only the kinds above
        raise AssertionError(unit.kind)
