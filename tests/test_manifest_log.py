"""Manifest commits through the append-only commit log (tokens and cache manifests alike).

A manifest committed shard by shard and never folded must read back exactly as the folded
``manifest.json``; a torn last record (a writer killed mid-append) is ignored and cut off by the
next commit, a damaged record before the last is refused, and a crash between folding and
removing the log changes nothing. No tokenizer, no model: manifests only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdscale.cache.manifest import CacheHeader, CacheManifest, CacheShardRecord, Fidelity
from kdscale.data.manifest import ShardRecord, SplitRecord, TokensManifest, load_tokens_manifest
from kdscale.errors import KDScaleError
from kdscale.manifest import LOG_NAME, MANIFEST_NAME


def tokens_manifest() -> TokensManifest:
    return TokensManifest(
        tokenizer="t", tokenizer_fingerprint="f" * 64, vocab_size=100, eos_id=2, separator="eos",
        seq_len=8, dtype="<u2", splits={"train": SplitRecord(), "eval": SplitRecord()}, stats={},
        inputs=["x"], complete=False,
    )  # fmt: skip


def cache_manifest() -> CacheManifest:
    header = CacheHeader(
        tokens_fingerprint="a", tokenizer_fingerprint="b", teacher="t", teacher_fingerprint="c",
        vocab_size=100, codec_params={"k": 4}, codec_fingerprint="d", codec={"kind": "topk"},
    )  # fmt: skip
    return CacheManifest(header=header, tokens_dir="/tokens")


def token_shard(i: int) -> ShardRecord:
    return ShardRecord(name=f"train-{i:06d}.tar", samples=10 + i, bytes=1000 + i, sha256=f"{i:064x}")


def cache_shard(i: int) -> CacheShardRecord:
    fidelity = Fidelity(positions=8, covered_mass_mean=0.9, covered_mass_min=0.5, kl_mean=0.1,
                        kl_max=0.2, tv_mean=0.1, support_mean=4.0, quant_kl_mean=0.0)  # fmt: skip
    return CacheShardRecord(name=f"train-{i:06d}.tar", split="train", token_shard=f"train-{i:06d}.tar",
                            samples=10, tokens=80, bytes=500, sha256=f"{i:064x}", fidelity=fidelity)  # fmt: skip


def commit_tokens(manifest: TokensManifest, root: Path, shards: range) -> None:
    for i in shards:
        manifest.commit_shard(root, "train", token_shard(i))


def commit_cache(manifest: CacheManifest, root: Path, shards: range) -> None:
    for i in shards:
        manifest.commit_shard(root, cache_shard(i))


KINDS = {
    "tokens": (tokens_manifest, commit_tokens, TokensManifest),
    "cache": (cache_manifest, commit_cache, CacheManifest),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_committed_manifest_reads_back_as_the_folded_one(tmp_path: Path, kind: str) -> None:
    make, commit, cls = KINDS[kind]
    manifest = make()
    manifest.write(tmp_path)
    header_bytes = (tmp_path / MANIFEST_NAME).read_bytes()
    commit(manifest, tmp_path, range(5))
    assert (tmp_path / MANIFEST_NAME).read_bytes() == header_bytes  # commits never rewrite it
    assert len((tmp_path / LOG_NAME).read_text().splitlines()) == 5
    logged = cls.load(tmp_path)
    assert logged == manifest and logged.fingerprint == manifest.fingerprint
    manifest.write(tmp_path)  # fold
    assert not (tmp_path / LOG_NAME).exists()
    assert cls.load(tmp_path) == logged
    if kind == "tokens":
        assert logged.splits["train"].samples == sum(10 + i for i in range(5))
        assert logged.splits["train"].tokens == 8 * logged.splits["train"].samples


@pytest.mark.parametrize("kind", list(KINDS))
def test_torn_last_record_is_ignored_and_cut_by_the_next_commit(tmp_path: Path, kind: str) -> None:
    make, commit, cls = KINDS[kind]
    manifest = make()
    manifest.write(tmp_path)
    commit(manifest, tmp_path, range(3))
    three = cls.load(tmp_path)
    log_path = tmp_path / LOG_NAME
    intact = log_path.read_bytes()
    commit(manifest, tmp_path, range(3, 4))
    fourth = log_path.read_bytes()[len(intact):]
    log_path.write_bytes(intact + fourth[: len(fourth) // 2])  # killed mid-append: no newline
    assert cls.load(tmp_path) == three
    flipped = bytearray(fourth)
    flipped[len(flipped) // 2] ^= 0x01  # a whole line whose checksum fails (torn, then filled)
    log_path.write_bytes(intact + bytes(flipped))
    assert cls.load(tmp_path) == three
    log_path.write_bytes(intact + fourth[: len(fourth) // 2])
    resumed = cls.load(tmp_path)
    commit(resumed, tmp_path, range(3, 5))  # the next writer appends after the torn bytes
    assert cls.load(tmp_path) == resumed and len(log_path.read_text().splitlines()) == 5


def test_damaged_record_before_the_last_is_refused(tmp_path: Path) -> None:
    manifest = tokens_manifest()
    manifest.write(tmp_path)
    commit_tokens(manifest, tmp_path, range(3))
    log_path = tmp_path / LOG_NAME
    lines = log_path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"samples":11', b'"samples":99')
    log_path.write_bytes(b"\n".join(lines))
    with pytest.raises(KDScaleError, match=r"manifest.log: commit record 2 of 3 is damaged"):
        TokensManifest.load(tmp_path)


def test_crash_between_fold_and_log_removal_changes_nothing(tmp_path: Path) -> None:
    manifest = tokens_manifest()
    manifest.write(tmp_path)
    commit_tokens(manifest, tmp_path, range(4))
    log_bytes = (tmp_path / LOG_NAME).read_bytes()
    manifest.write(tmp_path)
    (tmp_path / LOG_NAME).write_bytes(log_bytes)  # the fold's unlink never happened
    assert TokensManifest.load(tmp_path) == manifest  # records already folded apply as no-ops
    other = tokens_manifest()
    other.apply({"split": "train", "index": 0, "shard": token_shard(7).model_dump()})
    other.write(tmp_path)
    (tmp_path / LOG_NAME).write_bytes(log_bytes)  # a log that disagrees with manifest.json
    with pytest.raises(KDScaleError, match="damaged record.*train shard 0 differs"):
        TokensManifest.load(tmp_path)


def test_incomplete_token_set_is_refused_to_readers(tmp_path: Path) -> None:
    manifest = tokens_manifest()
    manifest.write(tmp_path)
    commit_tokens(manifest, tmp_path, range(2))
    with pytest.raises(KDScaleError, match=r"incomplete token set \(2 shards so far\).*run the same"):
        load_tokens_manifest(tmp_path)
    manifest.complete = True
    manifest.write(tmp_path)
    assert load_tokens_manifest(tmp_path).splits["train"].samples == 21


@pytest.mark.parametrize("kind", list(KINDS))
def test_manifest_json_under_a_log_is_still_checked_against_its_fingerprint(
    tmp_path: Path, kind: str
) -> None:
    """The seal holds in both forms: manifest.json by its fingerprint, each record by its
    checksum and its schema; the fold re-seals the whole."""
    make, commit, cls = KINDS[kind]
    manifest = make()
    manifest.write(tmp_path)
    commit(manifest, tmp_path, range(2))
    path = tmp_path / MANIFEST_NAME
    sealed = path.read_text()
    field = '"vocab_size": 100' if kind == "tokens" else '"tokens_dir": "/tokens"'
    edited = '"vocab_size": 101' if kind == "tokens" else '"tokens_dir": "/elsewhere"'
    path.write_text(sealed.replace(field, edited))
    if kind == "tokens":  # a trusted field: refused although the log is intact
        with pytest.raises(KDScaleError, match="fingerprint does not match its contents"):
            cls.load(tmp_path)
    else:  # tokens_dir is UNSIGNED (where the tokens were), so the edit is allowed
        assert cls.load(tmp_path).tokens_dir == "/elsewhere"
    path.write_text(sealed.replace('"fingerprint"', '"_fingerprint"'))
    with pytest.raises(KDScaleError, match="damaged manifest|fingerprint is missing"):
        cls.load(tmp_path)
    path.write_text(sealed)
    folded = cls.load(tmp_path)
    folded.write(tmp_path)  # fold and re-seal
    assert not (tmp_path / LOG_NAME).exists() and cls.load(tmp_path) == folded


def test_a_checksummed_record_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    from kdscale.manifest import append_record

    manifest = tokens_manifest()
    manifest.write(tmp_path)
    bad = {"split": "train", "index": 0, "shard": token_shard(0).model_dump() | {"samples": "many"}}
    append_record(tmp_path / LOG_NAME, bad)  # a valid checksum does not make a record trusted
    good = {"split": "train", "index": 1, "shard": token_shard(1).model_dump()}
    append_record(tmp_path / LOG_NAME, good)
    with pytest.raises(KDScaleError, match="damaged record"):
        TokensManifest.load(tmp_path)
    (tmp_path / LOG_NAME).unlink()
    append_record(tmp_path / LOG_NAME, ["not", "a", "record"])  # type: ignore[arg-type]
    append_record(tmp_path / LOG_NAME, good | {"index": 0})
    with pytest.raises(KDScaleError, match="commit record 1 is not an object"):
        TokensManifest.load(tmp_path)


def test_complete_is_sealed_and_source_digest_is_not(tmp_path: Path) -> None:
    manifest = tokens_manifest()
    manifest.write(tmp_path)
    path = tmp_path / MANIFEST_NAME
    sealed = path.read_text()
    path.write_text(sealed.replace('"complete": false', '"complete": true'))
    with pytest.raises(KDScaleError, match="fingerprint does not match its contents"):
        load_tokens_manifest(tmp_path)
    moved = tokens_manifest()
    moved.source_digest = "other inputs, same samples"
    assert moved.fingerprint == manifest.fingerprint  # provenance, like `inputs`: not identity


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_manifest_of_another_format_version_says_which_kdscale_wrote_it(tmp_path: Path, kind: str) -> None:
    """A manifest written by an older kdscale is refused as older (re-run the stage), not as
    damaged; a newer one asks for an upgrade."""
    make, _, cls = KINDS[kind]
    make().write(tmp_path)
    path = tmp_path / MANIFEST_NAME
    sealed = path.read_text()
    name, version = cls.FORMAT.rsplit("/", 1)
    path.write_text(sealed.replace(cls.FORMAT, f"{name}/{int(version) - 1}"))
    with pytest.raises(KDScaleError, match=rf"written by an older kdscale .*re-run `{cls.PRODUCER}`"):
        cls.load(tmp_path)
    path.write_text(sealed.replace(cls.FORMAT, f"{name}/{int(version) + 1}"))
    with pytest.raises(KDScaleError, match="written by a newer kdscale"):
        cls.load(tmp_path)
    path.write_text(sealed.replace(cls.FORMAT, "something-else"))
    with pytest.raises(KDScaleError, match="format 'something-else', this kdscale reads"):
        cls.load(tmp_path)
