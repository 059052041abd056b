"""The teacher-target codec: logits → sparse targets → bytes → sparse targets.

References are computed in float64 straight from the logits; tolerances are stated where used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdscale.cache.bitpack import StreamReader, pack_uint, packed_size, segment_cumsum
from kdscale.cache.codec import (
    codec_fingerprint,
    codec_params,
    decode,
    encode,
    index_bits,
    value_quantizer,
)
from kdscale.cache.fidelity import fidelity, support_kl
from kdscale.cache.quant import KL_BOUND, KL_DESIGN, X_MAX, quantizer, quantizer_for
from kdscale.cache.sparsify import concat_positions, sample_uniforms, sparsify
from kdscale.cache.targets import SparseTargets
from kdscale.config.cache import CodecConfig
from kdscale.errors import KDScaleError

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# float32 logits, float64 reductions: sparsify's log-probs match float64 to ~1e-6 absolute.
LOGP_ATOL = 1e-5


def random_logits(seed: int, rows: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def as_dict(targets: SparseTargets, row: int) -> dict[int, float]:
    """Kept id -> log-prob at one position."""
    ids, logp = targets.ids[0, row], targets.logp[0, row]
    return {int(i): float(v) for i, v in zip(ids, logp) if i >= 0}


# ---------------------------------------------------------------- sparsify vs float64


def test_topk_matches_float64_reference() -> None:
    logits = random_logits(0, 37, 301)
    cfg = CodecConfig(kind="topk", k=16)
    got = sparsify(logits, cfg)
    ref = torch.log_softmax(logits.double(), -1)
    values, ids = ref.topk(16, -1)
    assert got.shape == (1, 37, 16) and got.kind == "topk"
    assert torch.equal(got.ids[0], ids)
    torch.testing.assert_close(got.logp[0].double(), values, atol=LOGP_ATOL, rtol=0)
    tail = ref.scatter(-1, ids, -math.inf).logsumexp(-1)
    torch.testing.assert_close(got.tail_logp[0].double(), tail, atol=LOGP_ATOL, rtol=0)


def test_tail_is_accurate_when_the_kept_mass_is_nearly_one() -> None:
    logits = torch.full((2, 1000), -40.0)
    logits[:, 0] = 0.0  # the 999 others hold ~999 * exp(-40) ~ 4.2e-15 of the mass
    got = sparsify(logits, CodecConfig(kind="topk", k=1))
    expected = math.log(999) - 40.0 - math.log1p(999 * math.exp(-40.0))
    torch.testing.assert_close(
        got.tail_logp[0].double(),
        torch.full((2,), expected, dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )


def test_temperature_scales_logits() -> None:
    logits = random_logits(1, 5, 50)
    hot = sparsify(logits, CodecConfig(kind="topk", k=8, temperature=2.0))
    ref = torch.log_softmax(logits.double() / 2.0, -1).topk(8, -1).values
    torch.testing.assert_close(hot.logp[0].double(), ref, atol=LOGP_ATOL, rtol=0)


@pytest.mark.parametrize(("p", "min_k", "max_k"), [(0.5, 1, 40), (0.9, 3, 10), (1.0, 2, 6)])
def test_topp_keeps_the_smallest_covering_prefix(p: float, min_k: int, max_k: int) -> None:
    logits = random_logits(2, 30, 200, scale=2.0)
    cfg = CodecConfig(kind="topp", p=p, min_k=min_k, max_k=max_k)
    got = sparsify(logits, cfg)
    ref = torch.log_softmax(logits.double(), -1)
    values, ids = ref.sort(-1, descending=True)
    for row in range(30):
        mass_before = values[row].exp().cumsum(0) - values[row].exp()
        n = min(max(int((mass_before < p).sum()), min_k), max_k)
        kept = as_dict(got, row)
        assert list(kept) == ids[row, :n].tolist()
        np.testing.assert_allclose(list(kept.values()), values[row, :n].numpy(), atol=LOGP_ATOL)
        tail = values[row, n:].logsumexp(0)
        assert abs(float(got.tail_logp[0, row]) - float(tail)) < LOGP_ATOL


def test_k_larger_than_vocab_is_refused() -> None:
    with pytest.raises(KDScaleError, match=r"cache\.codec\.k=64 exceeds the vocabulary size 10"):
        sparsify(random_logits(0, 2, 10), CodecConfig(k=64))
    # The runner records codec_params once the teacher's vocabulary is known: refused there too.
    with pytest.raises(KDScaleError, match=r"cache\.codec\.k=11 exceeds .* 10; use at most 10 or k=full"):
        codec_params(CodecConfig(k=11), 10)


# ---------------------------------------------------------------- sampled (RS-KD)


def test_sampled_is_unbiased() -> None:
    """The mean of count/N over many independent positions approaches the teacher's p."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125])
    rows, draws = 4000, 10
    logits = probs.log().expand(rows, -1).contiguous()
    got = sparsify(logits, CodecConfig(kind="sampled", draws=draws), key="unbiased")
    estimate = torch.zeros(rows, 6, dtype=torch.float64)
    estimate.scatter_add_(1, got.ids[0].clamp(min=0), got.logp[0].double().exp() * got.valid[0])
    mean, stderr = estimate.mean(0), (probs.double() * (1 - probs.double()) / (rows * draws)).sqrt()
    assert torch.all((mean - probs.double()).abs() < 4 * stderr), (mean, probs)
    assert torch.all(torch.isneginf(got.tail_logp))


def test_sampled_never_draws_zero_probability_ids() -> None:
    logits = random_logits(3, 200, 64)
    logits[:, ::2] = -math.inf
    got = sparsify(logits, CodecConfig(kind="sampled", draws=50), key="k")
    kept = got.ids[0][got.valid[0]]
    assert kept.numel() > 0 and torch.all(kept % 2 == 1)


def test_sampled_counts_sum_to_draws_in_canonical_order() -> None:
    got = sparsify(
        random_logits(4, 50, 500, scale=1.0), CodecConfig(kind="sampled", draws=37), key="c"
    )
    counts = (got.logp[0].double().exp() * 37).round() * got.valid[0]
    assert torch.equal(counts.sum(-1), torch.full((50,), 37.0, dtype=torch.float64))
    for row in range(50):
        pairs = [(-c, i) for c, i in zip(counts[row].tolist(), got.ids[0, row].tolist()) if i >= 0]
        assert pairs == sorted(pairs)  # count descending, then id ascending


@pytest.mark.parametrize("splits", [[1, 99], [33, 33, 34], [7] * 14 + [2], [100]])
def test_sampled_is_independent_of_chunking(splits: list[int]) -> None:
    logits = random_logits(5, 100, 333, scale=1.5)
    cfg = CodecConfig(kind="sampled", draws=50, block=16)
    whole = sparsify(logits, cfg, key="sample-7")
    parts, start = [], 0
    for size in splits:
        parts.append(sparsify(logits[start : start + size], cfg, key="sample-7", start=start))
        start += size
    joined = concat_positions(parts)
    # Chunks have their own K; the joined form pads to the widest, as does the whole.
    assert torch.equal(joined.ids, whole.ids) and torch.equal(joined.logp, whole.logp)
    assert encode(joined, cfg, 333) == encode(whole, cfg, 333)


def test_sampled_draws_depend_on_key_seed_and_position() -> None:
    u = sample_uniforms("a", 0, np.arange(5), 50)
    assert np.array_equal(u, sample_uniforms("a", 0, np.arange(5), 50))
    assert not np.array_equal(u, sample_uniforms("b", 0, np.arange(5), 50))
    assert not np.array_equal(u, sample_uniforms("a", 1, np.arange(5), 50))
    assert np.array_equal(u[3:], sample_uniforms("a", 0, np.arange(3, 5), 50))
    assert ((u >= 0) & (u < 1)).all()
    big = sample_uniforms("x", 0, np.arange(2000), 50).ravel()
    # 100k uniforms: the mean is 0.5 with standard error 0.0009; every decile holds ~10%.
    assert abs(big.mean() - 0.5) < 0.005
    assert np.all(np.abs(np.histogram(big, bins=10, range=(0, 1))[0] / big.size - 0.1) < 0.005)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["topk", "topp", "sampled"])
def test_round_trip_keeps_ids_and_values(kind: str) -> None:
    vocab = 1000
    cfg = CodecConfig(kind=kind, k=32, max_k=32, p=0.8, draws=50, block=8)
    targets = sparsify(random_logits(6, 45, vocab), cfg, key="rt")
    decoded = decode(encode(targets, cfg, vocab), cfg, vocab)
    assert decoded.kind == kind and decoded.shape[:2] == targets.shape[:2]
    for row in range(45):
        assert set(as_dict(decoded, row)) == set(as_dict(targets, row))
    if kind == "sampled":
        for row in range(45):
            assert as_dict(decoded, row) == as_dict(targets, row)  # counts are stored exactly
    else:
        assert float(support_kl(targets, decoded).max()) < 1e-3
        total = torch.logaddexp(decoded.logp.double().logsumexp(-1), decoded.tail_logp.double())
        torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["topk", "topp", "sampled"])
def test_empty_and_single_position_samples(kind: str) -> None:
    cfg = CodecConfig(kind=kind, k=4, max_k=4, draws=5)
    for rows in (0, 1):
        targets = sparsify(random_logits(10, rows, 10), cfg, key="tiny")
        decoded = decode(encode(targets, cfg, 10), cfg, 10)
        assert decoded.shape[:2] == (1, rows) and decoded.kind == kind
        for r in range(rows):
            assert set(as_dict(decoded, r)) == set(as_dict(targets, r))


def test_default_top64_quantization_kl_on_flat_and_peaked_rows() -> None:
    """The worst case for the quantizer is a flat distribution: every entry has a coarse step."""
    cfg = CodecConfig()
    cases = [random_logits(s, 200, 65, scale) for s, scale in enumerate([0.01, 0.05, 0.2, 0.5])]
    cases += [random_logits(7, 100, 4096, 6.0), random_logits(8, 100, 4096, 1e-3)]
    for logits in cases:
        vocab = logits.shape[1]
        targets = sparsify(logits, cfg)
        kl = support_kl(targets, decode(encode(targets, cfg, vocab), cfg, vocab))
        assert float(kl.max()) <= 1e-3, float(kl.max())


def quantized_kl(logp: np.ndarray, quant) -> np.ndarray:
    """KL(exact ‖ renormalized quantized) per row of full log-prob rows."""
    back = quant.logp(quant.levels(logp))
    back = back - np.log(np.exp(back).sum(1, keepdims=True))
    return (np.exp(logp) * (logp - back)).sum(1)


@pytest.mark.parametrize(("k", "vocab"), [(80, 4096), (4096, 49152), ("full", 49152), ("full", 700)])
def test_large_support_quantization_kl_on_flat_and_peaked_rows(k: int | str, vocab: int) -> None:
    """Large supports switch to the flat step law and keep KL(kept ‖ stored) <= 1e-3."""
    cfg = CodecConfig(k=k)
    for seed, scale in enumerate([1e-3, 0.3, 1.0, 3.0, 8.0]):
        logits = random_logits(seed, 12, vocab, scale)
        targets = sparsify(logits, cfg)
        kl = support_kl(targets, decode(encode(targets, cfg, vocab), cfg, vocab))
        assert float(kl.max()) <= KL_BOUND, (scale, float(kl.max()))
    # The sqrt law alone would not do: on near-flat rows over a whole 49k vocabulary it loses
    # ~0.04 nats (each of the many small entries rounds with a step of up to 1 nat).
    if cfg.support(vocab) >= 4096:
        flat_rows = torch.log_softmax(random_logits(0, 4, vocab, 1.0).double(), -1).numpy()
        assert quantized_kl(flat_rows, quantizer(0.01, 1.0)).max() > 10 * KL_BOUND


@st.composite
def distributions(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    vocab = draw(st.integers(2, 3000))
    rows = draw(st.integers(1, 24))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 4.0, 12.0]))
    seed = draw(st.integers(0, 2**31))
    logits = random_logits(seed, rows, vocab, scale)
    if draw(st.booleans()):  # ties
        logits = logits.round()
    if draw(st.booleans()) and vocab > 2:  # some ids impossible
        logits[:, 1::3] = -math.inf
    return logits, vocab


@FAST
@given(
    data=distributions(), kind=st.sampled_from(["topk", "topp", "sampled"]), k=st.integers(1, 80)
)
def test_round_trip_property(data: tuple[torch.Tensor, int], kind: str, k: int) -> None:
    logits, vocab = data
    cfg = CodecConfig(kind=kind, k=min(k, vocab), max_k=k, min_k=1, p=0.9, draws=k, block=5)
    targets = sparsify(logits, cfg, key="prop")
    blob = encode(targets, cfg, vocab)
    assert blob == encode(targets, cfg, vocab)
    decoded = decode(blob, cfg, vocab)
    for row in range(logits.shape[0]):
        kept, back = as_dict(targets, row), as_dict(decoded, row)
        assert set(kept) == set(back)
        assert all(math.isfinite(logits[row, i]) for i in kept)
    if kind == "sampled":
        assert torch.equal(
            decoded.logp.exp().mul(k).round().sum(-1), torch.full(logits.shape[:1], float(k))[None]
        )
    else:
        # The quantizer's worst-case estimate over at most k+1 categories (kdscale.cache.quant);
        # 1.2: the estimate is second order.
        bound = value_quantizer(cfg, vocab).kl_bound(min(k, vocab) + 1)
        assert float(support_kl(targets, decoded).max()) <= bound * 1.2


@FAST
@given(
    vocab=st.one_of(
        st.sampled_from([2, 3, 255, 256, 257, 65535, 65536, 65537, 262144, 2**24 - 1, 2**24]),
        st.integers(2, 2**24),
    ),
    rows=st.integers(1, 20),
    width=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_ids_round_trip_at_any_vocab_size(vocab: int, rows: int, width: int, seed: int) -> None:
    """Bit packing is exact up to V = 2^24, including the ids next to each power of two."""
    rng = np.random.default_rng(seed)
    width = min(width, vocab)
    edges = np.array([0, vocab - 1, (vocab - 1) // 2], dtype=np.int64)
    pool = np.unique(np.concatenate([edges, rng.integers(0, vocab, 3 * width)]))
    if pool.size < width:
        pool = np.arange(vocab)
    ids = np.stack([rng.choice(pool, width, replace=False) for _ in range(rows)])
    logp = np.sort(-rng.exponential(2.0, (rows, width)), axis=1)[:, ::-1].copy()
    targets = SparseTargets(
        torch.from_numpy(ids)[None],
        torch.from_numpy(logp).float()[None],
        torch.full((1, rows), -30.0),
        "topk",
    )
    cfg = CodecConfig(k=width, block=3)
    decoded = decode(encode(targets, cfg, vocab), cfg, vocab)
    for row in range(rows):
        assert set(as_dict(decoded, row)) == set(ids[row].tolist())


def test_large_vocab_uses_18_bit_ids() -> None:
    vocab = 262_144
    assert index_bits(vocab) == 18 and index_bits(vocab + 1) == 19 and index_bits(2**24) == 24
    assert codec_params(CodecConfig(), vocab)["index_bits"] == 18
    ids = torch.tensor([[[vocab - 1, 0, 131_072, 200_000]]])
    targets = SparseTargets(
        ids,
        torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.05]]])),
        torch.log(torch.tensor([[0.05]])),
        "topk",
    )
    cfg = CodecConfig(k=4)
    assert set(as_dict(decode(encode(targets, cfg, vocab), cfg, vocab), 0)) == set(
        ids.flatten().tolist()
    )
    with pytest.raises(KDScaleError, match="vocab size"):
        index_bits(2**24 + 1)


# ---------------------------------------------------------------- full vocabulary (k = V)


@pytest.mark.parametrize("k", ["full", 300])
def test_full_layout_keeps_every_id_in_id_order(k: int | str) -> None:
    vocab, rows = 300, 40
    logits = random_logits(11, rows, vocab)
    logits[5, ::7] = -math.inf  # ids the teacher rules out at one position
    cfg = CodecConfig(k=k, block=8)
    targets = sparsify(logits, cfg)
    every_id = torch.arange(vocab).expand(rows, vocab)
    assert torch.equal(targets.ids[0], torch.where(torch.isneginf(logits), -1, every_id))
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(targets.logp[0].double(), ref, atol=LOGP_ATOL, rtol=0)
    assert torch.all(torch.isneginf(targets.tail_logp))
    blob = encode(targets, cfg, vocab)
    assert blob[6] == 1  # the header's layout byte: full
    decoded = decode(blob, cfg, vocab)
    assert torch.equal(decoded.ids, targets.ids) and torch.all(torch.isneginf(decoded.tail_logp))
    assert float(support_kl(targets, decoded).max()) <= KL_BOUND
    total = decoded.logp.double().logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-6, rtol=0)
    # Ids are implicit: the same support in canonical (probability-descending) order is the
    # same member.
    order = targets.logp.argsort(dim=-1, descending=True, stable=True)
    canonical = SparseTargets(
        targets.ids.gather(-1, order), targets.logp.gather(-1, order), targets.tail_logp, "topk"
    )
    assert encode(canonical, cfg, vocab) == blob


def test_full_layout_refuses_bad_targets_and_members() -> None:
    vocab, cfg = 6, CodecConfig(k="full")
    twice = SparseTargets(
        torch.tensor([[[0, 1, 1, 3, 4, 5]]]), torch.full((1, 1, 6), -math.log(6)),
        torch.tensor([[-math.inf]]), "topk",
    )  # fmt: skip
    with pytest.raises(KDScaleError, match="an id appears twice"):
        encode(twice, cfg, vocab)
    blob = encode(sparsify(random_logits(12, 3, vocab), cfg), cfg, vocab)
    sparse = bytearray(blob)
    sparse[6] = 0  # a full member that claims the sparse layout
    with pytest.raises(KDScaleError, match=r"corrupt \(layout 0, the codec writes 1\)"):
        decode(bytes(sparse), cfg, vocab)
    for message, edit in [("truncated payload", drop_last_byte), ("trailing payload", append_byte)]:
        with pytest.raises(KDScaleError, match=message):
            decode(reframe(blob, edit), cfg, vocab)
    with pytest.raises(KDScaleError, match="another codec config or vocab"):
        decode(blob, CodecConfig(k=5), vocab)


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def member() -> tuple[bytes, CodecConfig, int]:
    cfg, vocab = CodecConfig(k=16), 500
    return encode(sparsify(random_logits(8, 40, vocab), cfg), cfg, vocab), cfg, vocab


@pytest.mark.parametrize("cut", [0, 5, 19, 20, 21, 40, -1])
def test_truncated_members_raise(member: tuple[bytes, CodecConfig, int], cut: int) -> None:
    blob, cfg, vocab = member
    with pytest.raises(KDScaleError, match="cache member"):
        decode(blob[:cut], cfg, vocab)


def test_corrupt_members_raise(member: tuple[bytes, CodecConfig, int]) -> None:
    blob, cfg, vocab = member
    for where in (0, 4, 30, len(blob) // 2, len(blob) - 2):
        bad = bytearray(blob)
        bad[where] ^= 0x41
        with pytest.raises(KDScaleError, match="cache member"):
            decode(bytes(bad), cfg, vocab)


def reframe(blob: bytes, edit: Callable[[bytearray], None]) -> bytes:
    """The member with its (decompressed) payload edited and validly recompressed."""
    payload = bytearray(zstandard.ZstdDecompressor().decompress(blob[20:]))
    edit(payload)
    return blob[:20] + zstandard.ZstdCompressor(write_checksum=True).compress(bytes(payload))


def set_first_support_size(payload: bytearray) -> None:
    payload[0] = 17  # the n stream comes first: position 0 now claims 17 > k ids


def drop_last_byte(payload: bytearray) -> None:
    del payload[-1]


def append_byte(payload: bytearray) -> None:
    payload.append(0)


def bump_first_count(payload: bytearray) -> None:
    payload[4] += 1  # sampled: a 4-byte entry count, then count - 1 per entry


def test_inconsistent_payloads_raise(member: tuple[bytes, CodecConfig, int]) -> None:
    """Damage that survives zstd's checksum (a bad writer) is still caught by the decoder."""
    blob, cfg, vocab = member
    assert decode(reframe(blob, lambda payload: None), cfg, vocab).shape == (1, 40, 16)
    for message, edit in [
        ("support sizes", set_first_support_size),
        ("truncated payload", drop_last_byte),
        ("trailing payload", append_byte),
    ]:
        with pytest.raises(KDScaleError, match=message):
            decode(reframe(blob, edit), cfg, vocab)
    sampled = CodecConfig(kind="sampled", draws=20)
    blob = encode(sparsify(random_logits(9, 30, vocab), sampled, key="s"), sampled, vocab)
    with pytest.raises(KDScaleError, match="counts do not add up to 20 per position"):
        decode(reframe(blob, bump_first_count), sampled, vocab)


def test_member_from_another_codec_is_refused(member: tuple[bytes, CodecConfig, int]) -> None:
    blob, cfg, vocab = member
    with pytest.raises(KDScaleError, match="another codec config or vocab"):
        decode(blob, cfg.model_copy(update={"k": 17}), vocab)
    with pytest.raises(KDScaleError, match="another codec config or vocab"):
        decode(blob, cfg, vocab + 1)


def test_encode_rejects_bad_targets() -> None:
    cfg, vocab = CodecConfig(k=2), 10
    good = SparseTargets(
        torch.tensor([[[1, 2]]]), torch.tensor([[[-0.5, -1.5]]]), torch.tensor([[-2.0]]), "topk"
    )
    encode(good, cfg, vocab)
    cases = {
        "lie in": SparseTargets(torch.tensor([[[1, 10]]]), good.logp, good.tail_logp, "topk"),
        "twice": SparseTargets(torch.tensor([[[3, 3]]]), good.logp, good.tail_logp, "topk"),
        "finite": SparseTargets(
            good.ids, torch.tensor([[[-0.5, math.nan]]]), good.tail_logp, "topk"
        ),
        "kind": SparseTargets(good.ids, good.logp, good.tail_logp, "topp"),
        "1 .. 2 ids": SparseTargets(
            torch.tensor([[[-1, -1]]]), torch.full((1, 1, 2), -math.inf), good.tail_logp, "topk"
        ),
    }
    for message, targets in cases.items():
        with pytest.raises(KDScaleError, match=message):
            encode(targets, cfg, vocab)
    sampled = CodecConfig(kind="sampled", draws=4)
    not_counts = SparseTargets(
        good.ids, torch.log(torch.tensor([[[0.6, 0.4]]])), torch.tensor([[-math.inf]]), "sampled"
    )
    with pytest.raises(KDScaleError, match="not counts of 4 draws"):
        encode(not_counts, sampled, vocab)


# ---------------------------------------------------------------- building blocks


@FAST
@given(bits=st.integers(0, 32), count=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_uint_round_trip(bits: int, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = (
        rng.integers(0, 1 << bits, count, dtype=np.uint64) if bits else np.zeros(count, np.uint64)
    )
    other = rng.integers(0, 8, 5)
    buf = pack_uint(values, bits) + pack_uint(other, 3)
    assert len(buf) == packed_size(count, bits) + packed_size(5, 3)
    reader = StreamReader(buf, "test")
    assert np.array_equal(reader.take(count, bits), values.astype(np.int64))
    assert np.array_equal(reader.take(5, 3), other)
    reader.finish()
    with pytest.raises(KDScaleError, match="truncated"):
        reader.take(1, 8)


def test_segment_cumsum_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 9, 200)
    starts = rng.random(200) < 0.2
    starts[0] = True
    expected, running = [], 0
    for v, s in zip(values, starts):
        running = v if s else running + v
        expected.append(running)
    assert np.array_equal(segment_cumsum(values, starts), expected)


def test_quantizer_steps_and_bounds() -> None:
    quant = quantizer(0.01, 1.0)
    logp = -np.concatenate([np.linspace(0, 20, 20001), [X_MAX, 100.0]])
    levels = quant.levels(logp)
    assert np.all(np.diff(levels) >= 0) and levels[0] == 0
    err = np.abs(quant.logp(levels) - np.maximum(logp, -X_MAX))
    step = np.minimum(0.01 / np.sqrt(np.exp(logp)), 1.0)
    # Half a step of rounding; the step grows by exp(step / 2) across one cell (G's curvature).
    assert np.all(err <= 0.5 * step * np.exp(step / 2) + 1e-12)
    assert quant.levels(np.array([-np.inf]))[0] == quant.zero_level
    assert quant.logp(np.array([quant.zero_level]))[0] == -np.inf
    uniform = quantizer(0.0625, 0.0625)
    assert np.array_equal(uniform.levels(np.array([0.0, -1.0, -2.03])), [0, 16, 32])
    assert quantizer_for(0.01, 1.0, 64) is quant  # top-64 keeps the sqrt law (and its bytes)


@pytest.mark.parametrize("support", [80, 4096, 49152])
def test_flat_law_steps_and_bound(support: int) -> None:
    quant, n = quantizer_for(0.01, 1.0, support), support + 1
    a, b = quant.flat, quant.step
    assert a == pytest.approx(2 * math.sqrt(KL_DESIGN)) and b == pytest.approx(a / math.sqrt(n))
    assert quant.kl_bound(n) == pytest.approx(KL_DESIGN) and KL_DESIGN <= KL_BOUND
    logp = -np.concatenate([np.linspace(0, 40, 40001), [X_MAX, 100.0]])
    levels = quant.levels(logp)
    assert np.all(np.diff(levels) >= 0) and levels[0] == 0
    err = np.abs(quant.logp(levels) - np.maximum(logp, -X_MAX))
    step = np.minimum(np.maximum(a, b / np.sqrt(np.exp(logp))), 1.0)
    assert np.all(err <= 0.5 * step * np.exp(step / 2) + 1e-12)
    likely = logp >= -math.log(n)  # p >= 1/n: the flat step, half of it at most
    assert np.all(err[likely] <= a / 2 + 1e-12)
    assert quant.levels(np.array([-np.inf]))[0] == quant.zero_level


# ---------------------------------------------------------------- fidelity and params


def dense_fidelity(logits: torch.Tensor, targets: SparseTargets) -> tuple[torch.Tensor, ...]:
    """Reference: the implied distribution built densely (kept ids, tail spread uniformly)."""
    logp = torch.log_softmax(logits.double(), -1)
    probs = logp.exp()
    ids, valid = targets.ids[0], targets.valid[0]
    rest = logits.shape[1] - valid.sum(-1)
    spread = torch.where(rest > 0, targets.tail_logp[0].double() - rest.double().log(), -math.inf)
    implied = spread[:, None].expand_as(logp).clone()
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    implied[rows[valid], ids[valid]] = targets.logp[0].double()[valid]
    covered = (probs.gather(-1, ids.clamp(min=0)) * valid).sum(-1)
    kl = torch.where(probs > 0, probs * (logp - implied), 0.0).sum(-1)
    return covered, kl, 0.5 * (probs - implied.exp()).abs().sum(-1)


@pytest.mark.parametrize(
    "cfg",
    [
        CodecConfig(k=10),
        CodecConfig(kind="topp", p=0.6, max_k=40),
        CodecConfig(k="full"),
        CodecConfig(kind="sampled", draws=20),
    ],
    ids=["topk", "topp", "full", "sampled"],
)
def test_fidelity_closed_forms_match_the_dense_implied_distribution(cfg: CodecConfig) -> None:
    logits = random_logits(13, 30, 120, 2.0)
    logits[3, 50:] = -math.inf  # a position where most ids are impossible
    targets = sparsify(logits, cfg, key="fid")
    targets.logp[..., 1] -= 0.01  # the stored values need not equal the teacher's
    got = fidelity(logits, targets, 1.0)
    covered, kl, tv = dense_fidelity(logits, targets)
    torch.testing.assert_close(got.covered_mass, covered, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.kl, kl, atol=1e-12, rtol=1e-9)  # inf where mass is dropped
    torch.testing.assert_close(got.tv, tv, atol=1e-12, rtol=0)
    assert torch.isinf(kl).any() == (cfg.kind == "sampled")


def test_support_kl_matches_ids_in_any_order() -> None:
    gen = torch.Generator().manual_seed(14)
    ref = sparsify(random_logits(14, 25, 200), CodecConfig(kind="topp", p=0.7, max_k=30))
    noise = 0.05 * torch.randn(ref.shape, generator=gen)
    order = torch.rand(ref.shape, generator=gen).argsort(-1)
    pad = (0, 7)  # a wider approx, its slots shuffled
    approx = SparseTargets(
        torch.nn.functional.pad(ref.ids.gather(-1, order), pad, value=-1),
        torch.nn.functional.pad((ref.logp + noise).gather(-1, order), pad, value=-math.inf),
        ref.tail_logp - 0.01,
        "topp",
    )
    got = support_kl(ref, approx)
    for row in range(25):
        kept, back = as_dict(ref, row), as_dict(approx, row)
        tail = float(ref.tail_logp[0, row])
        expected = sum(math.exp(v) * (v - back[i]) for i, v in kept.items())
        expected += math.exp(tail) * (tail - float(approx.tail_logp[0, row])) if tail > -math.inf else 0.0
        assert float(got[0, row]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    other = SparseTargets(approx.ids.clone(), approx.logp, approx.tail_logp, "topp")
    other.ids[0, 4, 0] = 199 if int(other.ids[0, 4, 0]) != 199 else 198
    with pytest.raises(ValueError, match="does not keep exactly the reference's ids"):
        support_kl(ref, other)


def test_fidelity_of_topk_and_sampled() -> None:
    logits = random_logits(9, 20, 100)
    probs = torch.softmax(logits.double(), -1)
    top = sparsify(logits, CodecConfig(k=10))
    fid = fidelity(logits, top, temperature=1.0)
    torch.testing.assert_close(
        fid.covered_mass, 1 - top.tail_logp[0].double().exp(), atol=1e-6, rtol=0
    )
    # Reference: kept ids exact, the rest share the tail uniformly.
    ids = top.ids[0]
    implied = ((1 - probs.gather(1, ids).sum(1, keepdim=True)) / 90).expand(20, 100).clone()
    implied.scatter_(1, ids, probs.gather(1, ids))
    kl = (probs * (probs.log() - implied.log())).sum(1)
    torch.testing.assert_close(fid.kl, kl, atol=1e-6, rtol=0)
    torch.testing.assert_close(fid.tv, 0.5 * (probs - implied).abs().sum(1), atol=1e-6, rtol=0)
    everything = fidelity(logits, sparsify(logits, CodecConfig(k=100)), 1.0)
    assert float(everything.kl.abs().max()) < 1e-6 and float(everything.tv.max()) < 1e-6
    sampled = fidelity(
        logits, sparsify(logits, CodecConfig(kind="sampled", draws=20), key="f"), 1.0
    )
    assert torch.all(torch.isinf(sampled.kl)) and torch.all((sampled.tv > 0) & (sampled.tv < 1))


def test_codec_params_and_fingerprint() -> None:
    base = CodecConfig()
    assert codec_params(base, 49152) == {
        "version": 1,
        "kind": "topk",
        "vocab": 49152,
        "index_bits": 16,
        "temperature": 1.0,
        "block": 128,
        "k": 64,
        "quant_step": 0.01,
        "quant_step_max": 1.0,
    }
    fp = codec_fingerprint(base, 49152)
    assert fp == codec_fingerprint(CodecConfig(), 49152)
    assert fp == codec_fingerprint(base.model_copy(update={"zstd_level": 3, "draws": 7}), 49152)
    for changed in ({"k": 32}, {"temperature": 2.0}, {"quant_step": 0.02}, {"kind": "sampled"}):
        assert codec_fingerprint(base.model_copy(update=changed), 49152) != fp
    assert codec_fingerprint(base, 49153) != fp
    full = codec_params(CodecConfig(k="full"), 49152)
    assert full == codec_params(CodecConfig(k=49152), 49152)  # "full" is k = V
    assert full["k"] == 49152 and full["layout"] == "full"
    assert full["quant_flat_step"] == pytest.approx(2 * math.sqrt(KL_DESIGN))
    assert "layout" not in codec_params(CodecConfig(k=49151), 49152)
