"""Sparse teacher targets of one sample ↔ bytes (one cache member).

Layout: a 20-byte header (magic ``KDSC``, format version, kind, layout, the first 8 bytes of the
codec fingerprint, ``S``) and one zstandard frame (with content checksum) holding integer
streams whose widths follow from the codec and vocabulary (see :mod:`kdscale.cache.bitpack`).
Log-prob levels come from :func:`kdscale.cache.quant.quantizer_for` (the step law depends on
the support size). There are two layouts:

**Sparse** (layout 0; every kind, ``k < V``). Rows are in canonical order: probability
descending, then id ascending.

1. Values. ``topk``/``topp``: the support size per position, then quantized log-prob levels
   (ascending along a row): each row's first level and the deltas after it, then one tail level
   per position. ``sampled``: the number of entries, then ``count - 1`` per entry; each row's
   counts add up to ``N``, which delimits the rows.
2. Ids: each block of ``block`` positions has a dictionary, its distinct ids sorted and
   gap-coded with ceil(log2 V) bits; entries store their rank in it. Within a run of equal
   values ranks ascend, so the first rank of a run is stored whole and the others as gaps
   (one stream, in entry order).

**Full** (layout 1; ``topk`` with ``k = V``, codec parameter ``layout: full``). Ids are
implicit: ``S × V`` levels in id order (``p = 0``, i.e. an id the teacher rules out, is the
zero level), then one tail level per position. Decoded rows are in id order: slot ``j`` holds
id ``j``, or is empty where the teacher gives id ``j`` probability zero.

Ids and ranks use exactly as many bit planes as they need; the small, skewed value streams
use whole bytes, which zstandard's entropy coder models better than bit planes.
Decoding renormalizes: ``topk``/``topp`` support probabilities plus the tail sum to one.
Encoding is deterministic (byte-identical for identical input on one platform). Work on the
full layout runs in blocks of positions, so temporaries stay O(V) per position.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import torch
import zstandard

from kdscale.cache.bitpack import StreamReader, bits_for, first_of_rows, pack_uint, segment_cumsum
from kdscale.cache.quant import LogProbQuantizer, quantizer_for
from kdscale.cache.sparsify import sampled_logp
from kdscale.cache.targets import EMPTY_ID, TARGET_KINDS, SparseTargets
from kdscale.config.cache import CodecConfig
from kdscale.errors import KDScaleError

CODEC_VERSION = 1
MAX_VOCAB = 1 << 24
TARGETS_MEMBER = "targets"  # a cache shard's member holding one sample's encoded targets
_MAGIC = b"KDSC"
_HEADER = struct.Struct("<4sBBBx8sI")
LAYOUT_SPARSE, LAYOUT_FULL = 0, 1  # the header's layout byte (members before layouts hold 0)
_BLOCK_ELEMENTS = 1 << 22  # full layout: entries per block of positions


def index_bits(vocab: int) -> int:
    """Bits per token id: ceil(log2 V)."""
    if not 2 <= vocab <= MAX_VOCAB:
        raise KDScaleError(f"vocab size {vocab} unsupported; allowed: 2 .. {MAX_VOCAB}")
    return bits_for(vocab - 1)


def codec_params(cfg: CodecConfig, vocab: int) -> dict[str, Any]:
    """The parameters that define a cache's targets and bytes (recorded in the manifest).

    ``k = "full"`` is recorded as ``k = V`` with ``layout: full``; a flat quantization law
    (:func:`value_quantizer`) adds its step as ``quant_flat_step``.
    """
    support = cfg.support(vocab)
    params: dict[str, Any] = {
        "version": CODEC_VERSION,
        "kind": cfg.kind,
        "vocab": vocab,
        "index_bits": index_bits(vocab),
        "temperature": cfg.temperature,
        "block": cfg.block,
    }
    if cfg.kind == "topk":
        params["k"] = support
        if support == vocab:
            params["layout"] = "full"
    elif cfg.kind == "topp":
        params.update(p=cfg.p, min_k=cfg.min_k, max_k=cfg.max_k)
    else:
        params.update(draws=cfg.draws, seed=cfg.seed)
    if cfg.kind != "sampled":
        params.update(quant_step=cfg.quant_step, quant_step_max=cfg.quant_step_max)
        flat = value_quantizer(cfg, vocab).flat
        if flat:
            params["quant_flat_step"] = flat
    return params


def value_quantizer(cfg: CodecConfig, vocab: int) -> LogProbQuantizer:
    """The log-prob quantizer of a ``topk``/``topp`` codec (its step law depends on the support)."""
    return quantizer_for(cfg.quant_step, cfg.quant_step_max, cfg.support(vocab))


def codec_fingerprint(cfg: CodecConfig, vocab: int) -> str:
    """A short stable digest of :func:`codec_params`."""
    blob = json.dumps(codec_params(cfg, vocab), sort_keys=True).encode()
    return "kdsc1-" + hashlib.sha256(blob).hexdigest()[:32]


class _Widths:
    """Bit widths of every stream, derived from the codec and the vocabulary alone."""

    def __init__(self, cfg: CodecConfig, vocab: int) -> None:
        self.support = cfg.support(vocab)
        self.layout = LAYOUT_FULL if cfg.is_full(vocab) else LAYOUT_SPARSE
        self.ids = index_bits(vocab)
        self.n = _whole_bytes(bits_for(self.support))
        block_ids = min(vocab, cfg.block * self.support)
        self.dict_size = bits_for(block_ids)
        self.rank = bits_for(block_ids - 1)
        self.quant: LogProbQuantizer | None = None
        if cfg.kind == "sampled":
            self.entries = 32
            self.level = _whole_bytes(bits_for(cfg.draws - 1))  # count - 1
        else:
            self.quant = value_quantizer(cfg, vocab)
            self.zero_level = self.quant.zero_level
            self.level = _whole_bytes(bits_for(self.zero_level))


def _whole_bytes(bits: int) -> int:
    return -(-bits // 8) * 8


def _fp_bytes(cfg: CodecConfig, vocab: int) -> bytes:
    return bytes.fromhex(codec_fingerprint(cfg, vocab).split("-")[1][:16])


def encode(targets: SparseTargets, cfg: CodecConfig, vocab: int) -> bytes:
    """Serialize the targets of one sample (``B = 1``) into one self-checking member."""
    if targets.kind != cfg.kind or targets.shape[0] != 1:
        raise KDScaleError(
            f"encode: expected kind={cfg.kind!r} targets of one sample, got kind="
            f"{targets.kind!r} with shape {tuple(targets.shape)}"
        )
    w = _Widths(cfg, vocab)
    if w.layout == LAYOUT_FULL:
        streams = _full_streams(targets, w, vocab)
    else:
        streams = _sparse_streams(targets, cfg, vocab, w)
    compressor = zstandard.ZstdCompressor(level=cfg.zstd_level, write_checksum=True)
    header = _HEADER.pack(
        _MAGIC, CODEC_VERSION, TARGET_KINDS.index(cfg.kind), w.layout, _fp_bytes(cfg, vocab),
        targets.shape[1],
    )
    return header + compressor.compress(b"".join(streams))


def _sparse_streams(
    targets: SparseTargets, cfg: CodecConfig, vocab: int, w: _Widths
) -> list[bytes]:
    """The streams of the sparse layout (module docstring)."""
    ids, levels, tail_levels, n = _to_levels(targets, cfg, vocab, w)
    rows = np.repeat(np.arange(n.size), n)
    order = np.lexsort((ids, levels, rows))
    ids, levels = ids[order], levels[order]
    _, first = first_of_rows(n)
    if tail_levels is None:  # sampled: level = N - count
        streams = [pack_uint([ids.size], w.entries), pack_uint(cfg.draws - 1 - levels, w.level)]
    else:
        streams = [pack_uint(n, w.n), pack_uint(levels[first], w.level)]
        streams.append(pack_uint(np.diff(levels)[~first[1:]], w.level))
        streams.append(pack_uint(tail_levels, w.level))
    # Block dictionaries: distinct ids per block, sorted; entries refer to them by rank.
    block_of = rows // cfg.block
    keys = block_of * vocab + ids
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    new_key = np.ones(keys.size, dtype=bool)
    new_key[1:] = sorted_keys[1:] != sorted_keys[:-1]
    dict_block, dict_ids = np.divmod(sorted_keys[new_key], vocab)
    dict_sizes = np.bincount(dict_block, minlength=-(-n.size // cfg.block))
    dict_first = np.ones(dict_ids.size, dtype=bool)
    dict_first[1:] = dict_block[1:] != dict_block[:-1]
    dict_gaps = np.where(dict_first, dict_ids, np.diff(dict_ids, prepend=-1) - 1)
    ranks = np.empty(keys.size, dtype=np.int64)
    ranks[by_key] = np.cumsum(new_key) - 1
    ranks -= (np.cumsum(dict_sizes) - dict_sizes)[block_of]
    # Within a run of equal levels ranks ascend: store the first whole, then gaps.
    run_start = first.copy()
    run_start[1:] |= levels[1:] != levels[:-1]
    rank_steps = np.where(run_start, ranks, np.diff(ranks, prepend=0) - 1)
    streams += [pack_uint(dict_sizes, w.dict_size), pack_uint(dict_gaps, w.ids)]
    streams.append(pack_uint(rank_steps, w.rank))
    return streams


def _check_entries(
    ids: np.ndarray, logp: np.ndarray, n: np.ndarray, vocab: int, support: int
) -> None:
    """Kept entries (flat, row-major) and the support size of each of their rows."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise KDScaleError(f"encode: token ids must lie in [0, {vocab}) or be {EMPTY_ID} (empty)")
    if n.size and not 1 <= n.min() <= n.max() <= support:
        raise KDScaleError(
            f"encode: every position needs 1 .. {support} ids; got {n.min()} .. {n.max()}"
        )
    if not np.all((logp <= 0) & np.isfinite(logp)):
        raise KDScaleError("encode: kept log-probs must be finite and <= 0")


def _tail_levels(targets: SparseTargets, quant: LogProbQuantizer) -> np.ndarray:
    tail = targets.tail_logp[0].cpu().numpy().astype(np.float64)
    if np.any(np.isnan(tail) | (tail > 0)):
        raise KDScaleError("encode: tail log-probs must be <= 0 or -inf")
    return quant.levels(tail)


def _to_levels(
    targets: SparseTargets, cfg: CodecConfig, vocab: int, w: _Widths
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Flat ids and levels (row-major), tail levels (or None) and support sizes; validated."""
    ids_SK = targets.ids[0].cpu().numpy()
    valid = ids_SK != EMPTY_ID
    n = valid.sum(1)
    ids = ids_SK[valid]
    logp = targets.logp[0].cpu().numpy()[valid].astype(np.float64)
    _check_entries(ids, logp, n, vocab, w.support)
    rows = np.repeat(np.arange(n.size), n)
    row_ids = np.sort(rows * vocab + ids)
    if np.any(row_ids[1:] == row_ids[:-1]):
        raise KDScaleError("encode: an id appears twice at one position")
    if cfg.kind == "sampled":
        exact = np.exp(logp) * cfg.draws
        counts = np.rint(exact).astype(np.int64)
        sums = np.bincount(rows, weights=counts, minlength=n.size)
        if np.abs(exact - counts).max(initial=0) > 1e-3 or np.any(sums != cfg.draws):
            raise KDScaleError(f"encode: sampled log-probs are not counts of {cfg.draws} draws")
        if not np.all(np.isneginf(targets.tail_logp[0].cpu().numpy())):
            raise KDScaleError("encode: sampled targets have no tail mass (tail_logp = -inf)")
        return ids, cfg.draws - counts, None, n
    return ids, w.quant.levels(logp), _tail_levels(targets, w.quant), n


def _full_streams(targets: SparseTargets, w: _Widths, vocab: int) -> list[bytes]:
    """The streams of the full layout: ``S × V`` levels in id order, then the tail levels."""
    ids_SK, logp_SK = targets.ids[0].cpu(), targets.logp[0].cpu()
    n_rows, width = ids_SK.shape
    levels_SV = np.full((n_rows, vocab), w.zero_level, dtype=np.uint16)
    every_id = np.arange(vocab)
    step = max(1, _BLOCK_ELEMENTS // max(width, 1))
    for r0 in range(0, n_rows, step):
        ids, logp = ids_SK[r0 : r0 + step].numpy(), logp_SK[r0 : r0 + step].numpy()
        block, valid = levels_SV[r0 : r0 + step], ids != EMPTY_ID
        if width == vocab and np.array_equal(ids, np.broadcast_to(every_id, ids.shape)):
            # Every id, slot j holding id j (as sparsify writes full targets): no scatter.
            _check_entries(every_id, logp, valid.sum(1), vocab, vocab)
            block[:] = w.quant.levels(logp)
            continue
        rows, slots = np.nonzero(valid)
        kept = ids[rows, slots]
        _check_entries(kept, logp[rows, slots].astype(np.float64), valid.sum(1), vocab, vocab)
        block[rows, kept] = w.quant.levels(logp[rows, slots])
        if np.any((block != w.zero_level).sum(1) != valid.sum(1)):
            raise KDScaleError("encode: an id appears twice at one position")
    return [pack_uint(levels_SV, w.level), pack_uint(_tail_levels(targets, w.quant), w.level)]


def decode(blob: bytes, cfg: CodecConfig, vocab: int) -> SparseTargets:
    """The targets (``B = 1``) of one member written by :func:`encode`, in canonical order
    (sparse layout) or id order (full layout)."""
    what = "cache member"
    if len(blob) < _HEADER.size:
        raise KDScaleError(f"{what}: truncated ({len(blob)} bytes, header is {_HEADER.size})")
    magic, version, kind, layout, fp, n_rows = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != CODEC_VERSION:
        raise KDScaleError(f"{what}: not a kdscale codec v{CODEC_VERSION} member (magic {magic!r})")
    if kind != TARGET_KINDS.index(cfg.kind) or fp != _fp_bytes(cfg, vocab):
        raise KDScaleError(
            f"{what}: written with another codec config or vocab (fingerprint {fp.hex()}, "
            f"expected {_fp_bytes(cfg, vocab).hex()} for {codec_fingerprint(cfg, vocab)})"
        )
    try:
        payload = zstandard.ZstdDecompressor().decompress(blob[_HEADER.size :])
    except zstandard.ZstdError as exc:
        raise KDScaleError(f"{what}: corrupt or truncated payload ({exc})") from None
    w, reader = _Widths(cfg, vocab), StreamReader(payload, what)
    if layout != w.layout:
        raise KDScaleError(f"{what}: corrupt (layout {layout}, the codec writes {w.layout})")
    if w.layout == LAYOUT_FULL:
        return _read_full(reader, w, n_rows, vocab, what)
    if cfg.kind == "sampled":
        n, levels = _read_counts(reader, w, cfg.draws, n_rows, what)
        tail_levels = None
        offsets, first = first_of_rows(n)
    else:
        n = reader.take(n_rows, w.n)
        if n.size and not 1 <= n.min() <= n.max() <= w.support:
            raise KDScaleError(f"{what}: corrupt (support sizes {n.min()} .. {n.max()})")
        offsets, first = first_of_rows(n)
        steps = np.empty(first.size, dtype=np.int64)
        steps[first] = reader.take(n_rows, w.level)
        steps[~first] = reader.take(first.size - n_rows, w.level)
        levels = segment_cumsum(steps, first)
        tail_levels = reader.take(n_rows, w.level)
        if levels.max(initial=0) >= w.zero_level or tail_levels.max(initial=0) > w.zero_level:
            raise KDScaleError(f"{what}: corrupt (a log-prob level is out of range)")
    dict_sizes = reader.take(-(-n_rows // cfg.block), w.dict_size)
    dict_offsets = np.cumsum(dict_sizes) - dict_sizes
    dict_first = np.zeros(int(dict_sizes.sum()), dtype=bool)
    dict_first[dict_offsets[dict_sizes > 0]] = True
    dict_ids = segment_cumsum(reader.take(dict_first.size, w.ids) + ~dict_first, dict_first)
    run_start = first.copy()
    run_start[1:] |= levels[1:] != levels[:-1]
    ranks = segment_cumsum(reader.take(first.size, w.rank) + ~run_start, run_start)
    reader.finish()
    row_block = np.arange(n_rows) // cfg.block
    if (dict_ids.size and dict_ids.max() >= vocab) or np.any(
        ranks >= np.repeat(dict_sizes[row_block], n)
    ):
        raise KDScaleError(f"{what}: corrupt (an id or rank is out of range)")
    ids = dict_ids[np.repeat(dict_offsets[row_block], n) + ranks]
    logp, tail = _values(levels, tail_levels, offsets, n, cfg.draws, w.quant)
    width = int(n.max(initial=0))
    return SparseTargets(
        torch.from_numpy(_padded(ids, offsets, n, width, EMPTY_ID))[None],
        torch.from_numpy(_padded(logp, offsets, n, width, -np.inf))[None],
        torch.from_numpy(tail)[None],
        cfg.kind,
    )


def _read_full(
    reader: StreamReader, w: _Widths, n_rows: int, vocab: int, what: str
) -> SparseTargets:
    """Full-layout targets in id order: slot ``j`` is id ``j``, empty at the zero level."""
    levels_SV = reader.take(n_rows * vocab, w.level).reshape(n_rows, vocab)
    tail_levels = reader.take(n_rows, w.level)
    reader.finish()
    if levels_SV.max(initial=0) > w.zero_level or tail_levels.max(initial=0) > w.zero_level:
        raise KDScaleError(f"{what}: corrupt (a log-prob level is out of range)")
    kept_SV = levels_SV != w.zero_level
    if not kept_SV.any(1).all():
        raise KDScaleError(f"{what}: corrupt (a position keeps no id)")
    ids_SV = np.where(kept_SV, np.arange(vocab), EMPTY_ID)
    logp_SV = np.empty((n_rows, vocab), dtype=np.float32)
    tail = np.empty(n_rows, dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // vocab)
    for r0 in range(0, n_rows, step):
        levels, tails = levels_SV[r0 : r0 + step], tail_levels[r0 : r0 + step]
        log_z = np.log(w.quant.prob(levels).sum(1) + w.quant.prob(tails))
        logp = w.quant.logp(levels).astype(np.float32)
        logp_SV[r0 : r0 + step] = logp - log_z.astype(np.float32)[:, None]
        tail[r0 : r0 + step] = w.quant.logp(tails) - log_z
    return SparseTargets(
        torch.from_numpy(ids_SV)[None],
        torch.from_numpy(logp_SV)[None],
        torch.from_numpy(tail)[None],
        "topk",
    )


def _read_counts(
    reader: StreamReader, w: _Widths, draws: int, n_rows: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Support sizes and levels (``N - count``) of sampled targets; rows end where the running
    count reaches a multiple of ``N``."""
    entries = int(reader.take(1, w.entries)[0])
    if entries > n_rows * draws:
        raise KDScaleError(f"{what}: corrupt ({entries} entries for {n_rows} positions)")
    counts = reader.take(entries, w.level) + 1
    running = np.cumsum(counts)
    ends = np.flatnonzero(running % draws == 0)
    if ends.size != n_rows or (entries and running[-1] != n_rows * draws):
        raise KDScaleError(f"{what}: corrupt (counts do not add up to {draws} per position)")
    return np.diff(ends, prepend=-1), draws - counts


def _padded(
    flat: np.ndarray, offsets: np.ndarray, n: np.ndarray, width: int, fill: float
) -> np.ndarray:
    """Row-major ragged entries as ``[S, width]``, empty slots set to ``fill``."""
    if n.size and n.min() == width:
        return flat.reshape(n.size, width)
    out = np.full((n.size, width), fill, dtype=flat.dtype)
    shift = np.repeat(np.arange(n.size) * width - offsets, n)
    out.reshape(-1)[np.arange(flat.size) + shift] = flat
    return out


def _values(
    levels: np.ndarray,
    tail_levels: np.ndarray | None,
    offsets: np.ndarray,
    n: np.ndarray,
    draws: int,
    quant: LogProbQuantizer | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 log-probs of the entries and tails, normalized per position."""
    if not n.size:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    if tail_levels is None or quant is None:
        return sampled_logp(draws - levels, draws), np.full(n.size, -np.inf, np.float32)
    log_z = np.log(np.add.reduceat(quant.prob(levels), offsets) + quant.prob(tail_levels))
    logp = quant.logp(levels).astype(np.float32) - np.repeat(log_z.astype(np.float32), n)
    return logp, (quant.logp(tail_levels) - log_z).astype(np.float32)
