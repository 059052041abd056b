"""Tokenize work units, in this process or on a pool of worker processes, results in unit order.

    job = TokenizeJob(encoder=Tokenizer("smollm2-135m").portable(), text_field="text",
                      batch_docs=256, eval_fraction=0.02, separator_id=2, vocab_size=49152,
                      dtype="<u2")
    for result in tokenized_units(units, job, workers=4):   # in unit order
        ...

A unit becomes a :class:`TokenizedUnit`: its documents' ids end to end (in the token dtype),
their lengths and which are held out. Tokenizing is the expensive, embarrassingly parallel part of
``kdscale data``; the driver packs, deduplicates and writes the results in unit order, so the
output does not depend on the number of workers.

Workers are spawned processes (``concurrent.futures``), not Ray actors: the stage is CPU-only
and runs on the node that sees the files, no cluster is needed, and a worker starts in well
under a second (it loads the fast tokenizer's serialized form with ``tokenizers``, without
transformers or torch). At most ``2 × workers`` units are in flight, which bounds
the driver's memory. A worker whose driver died (even by SIGKILL) exits within a second.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from kdscale.data.tokenizer import PortableEncoder
from kdscale.data.units import Unit, unit_documents
from kdscale.errors import KDScaleError

Encode = Callable[[list[str]], list[np.ndarray]]


@dataclass(frozen=True)
class TokenizeJob:
    """What every unit is tokenized with (sent once to each worker)."""

    encoder: PortableEncoder
    text_field: str
    batch_docs: int
    eval_fraction: float
    separator_id: int | None
    vocab_size: int
    dtype: str


@dataclass
class TokenizedUnit:
    """One unit's documents: ``ids`` end to end, ``lengths`` [docs], ``held_out`` bool [docs]."""

    ids: np.ndarray
    lengths: np.ndarray
    held_out: np.ndarray

    def documents(self) -> Iterator[tuple[np.ndarray, bool]]:
        """``(int64 ids, held out)`` per document, in order."""
        ends = np.cumsum(self.lengths)
        for end, length, held in zip(ends.tolist(), self.lengths.tolist(), self.held_out.tolist()):
            yield self.ids[end - length : end].astype(np.int64), held


def is_held_out(ids: np.ndarray, fraction: float, separator_id: int | None) -> bool:
    """Pick held-out documents by a hash of their token ids, so the split ignores input order
    and input format (text and pre-tokenized copies of a document land on the same side)."""
    if fraction <= 0:
        return False
    if separator_id is not None and len(ids) and ids[-1] == separator_id:
        ids = ids[:-1]
    digest = hashlib.blake2b(ids.astype("<i8").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise KDScaleError(
            f"data.inputs: token id {int(ids.max())} outside the tokenizer's vocabulary "
            f"[0, {vocab_size}); was it tokenized with a different tokenizer?"
        )


def _documents_ids(unit: Unit, job: TokenizeJob, encode: Encode) -> Iterator[np.ndarray]:
    batch: list[str] = []
    for doc in unit_documents(unit, job.text_field):
        if isinstance(doc, np.ndarray):
            yield doc
            continue
        batch.append(doc)
        if len(batch) == job.batch_docs:
            yield from encode(batch)
            batch = []
    if batch:
        yield from encode(batch)


def tokenize_unit(unit: Unit, job: TokenizeJob, encode: Encode) -> TokenizedUnit:
    """Read and tokenize one unit with ``encode`` (a loaded ``job.encoder``)."""
    parts, lengths, held = [], [], []
    for ids in _documents_ids(unit, job, encode):
        _check_ids(ids, job.vocab_size)
        parts.append(ids.astype(job.dtype))
        lengths.append(len(ids))
        held.append(unit.split == "eval" or is_held_out(ids, job.eval_fraction, job.separator_id))
    ids_all = np.concatenate(parts) if parts else np.empty(0, job.dtype)
    return TokenizedUnit(ids_all, np.asarray(lengths, np.int64), np.asarray(held, bool))


# --- worker processes ---------------------------------------------------------------------------

_worker: tuple[TokenizeJob, Encode] | None = None


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(job: TokenizeJob, parent: int) -> None:
    global _worker
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the pool parallelizes
    _worker = (job, job.encoder.load())


def _work(unit: Unit) -> TokenizedUnit:
    assert _worker is not None
    return tokenize_unit(unit, *_worker)


def tokenized_units(units: list[Unit], job: TokenizeJob, workers: int) -> Iterator[TokenizedUnit]:
    """Each unit tokenized, in unit order: in this process when ``workers`` ≤ 1, else on a pool
    of ``workers`` processes with at most ``2 × workers`` units in flight."""
    if workers <= 1:
        encode = job.encoder.load()
        for unit in units:
            yield tokenize_unit(unit, job, encode)
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(job, os.getpid())
    )
    pending: deque[Future[TokenizedUnit]] = deque()
    queued = iter(units)
    try:
        for unit in queued:
            pending.append(pool.submit(_work, unit))
            if len(pending) == 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            unit = next(queued, None)
            if unit is not None:
                pending.append(pool.submit(_work, unit))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
