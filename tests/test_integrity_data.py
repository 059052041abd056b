"""Token and cache shards that were tampered with or damaged, read by the real commands.

Every case damages copies of the session's token set and cache (real webdataset tars); where
the manifests would give the damage away, they are resealed as whoever hands the directories
over could. Each command must refuse with one line naming the file (and entry or sample), run
nothing from the data, and never train or evaluate on the damage.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers_integrity import (
    append_member,
    assert_one_line_error,
    copy_pair,
    flip,
    payload,
    reseal_cache,
    reseal_tokens,
    run_cli,
)

from kdscale.cache.codec import TARGETS_MEMBER
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.shards import TOKENS_MEMBER
from kdscale.data.tarindex import index_shard
from kdscale.manifest import MANIFEST_NAME


@pytest.fixture
def pair(tmp_path, tiny_tokens_dir, tiny_cache_dir) -> tuple[Path, Path]:
    return copy_pair(tiny_tokens_dir, tiny_cache_dir, tmp_path)


def _first_shard(tokens: Path, split: str = "train") -> Path:
    return tokens / load_tokens_manifest(tokens).splits[split].shards[0].name


# (entry name from the shard's first key, tar type, what the error names)
FOREIGN = {
    "pickle .pyd member": ("{key}.pyd", tarfile.REGTYPE, ".pyd'"),
    "torch .pth member": ("{key}.pth", tarfile.REGTYPE, ".pth'"),
    "path traversal": ("../{key}.tokens.npy", tarfile.REGTYPE, "'../"),
    "absolute path": ("/tmp/{key}.tokens.npy", tarfile.REGTYPE, "'/tmp/"),
    "sub-directory": ("sub/{key}.tokens.npy", tarfile.REGTYPE, "'sub/"),
    "control character": ("{key}\x1b.tokens.npy", tarfile.REGTYPE, "\\x1b"),
    "symbolic link": ("{key}x.tokens.npy", tarfile.SYMTYPE, "not a regular file"),
    "repeated key": ("{key}.tokens.npy", tarfile.REGTYPE, "appears twice"),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_a_token_shard_with_a_foreign_entry_is_refused_naming_it(pair, tmp_path, capsys, case):
    tokens, cache = pair
    shard, marker = _first_shard(tokens), tmp_path / "executed"
    key = index_shard(shard, TOKENS_MEMBER, "token shard").keys[0]
    name, kind, named = FOREIGN[case]
    append_member(shard, name.format(key=key), payload(marker), kind)
    reseal_tokens(tokens)
    reseal_cache(cache, tokens)
    status, _, err = run_cli(capsys, "inspect-cache", str(cache))
    assert_one_line_error(status, err, shard.name, named)
    assert not marker.exists()


def _flip_every_sample(shard: Path, member: str, past_header: int) -> None:
    """Invert one byte in every member of ``shard``, ``past_header`` bytes into its data."""
    index = index_shard(shard, member, "shard")
    blob = bytearray(shard.read_bytes())
    for offset in index.offsets:
        blob[int(offset) + past_header] ^= 0x01
    shard.write_bytes(bytes(blob))


def test_flipped_token_ids_are_named_in_training_and_evaluation(
    pair, tmp_path, capsys, tiny_run_dir
):
    tokens, _ = pair
    manifest = load_tokens_manifest(tokens)
    for split in ("train", "eval"):
        for shard in manifest.splits[split].shards:
            _flip_every_sample(tokens / shard.name, TOKENS_MEMBER, 128 + 10)  # a token id
    reseal_tokens(tokens)  # the sha256s agree again: only the content keys can tell
    status, _, err = run_cli(capsys, "eval", str(tiny_run_dir), "--data", str(tokens))
    assert_one_line_error(status, err, "eval-000000.tar: sample 0",
                          "do not match their key")  # fmt: skip
    status, _, err = run_cli(capsys, "train", "--tokens", str(tokens), "--out",
                             str(tmp_path / "student"), "--steps", "1",
                             *sum((["--set", s] for s in _TINY), []))  # fmt: skip
    assert_one_line_error(status, err, "train-0000", "do not match their key")
    assert not list((tmp_path / "student").glob("checkpoints/step_*"))  # never trained on


_TINY = ["model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=49152",
         "model.max_position_embeddings=64", "train.global_batch=4", "wandb.enabled=false"]  # fmt: skip


def test_a_damaged_npy_header_is_named(pair, capsys):
    tokens, cache = pair
    shard = _first_shard(tokens)
    _flip_every_sample(shard, TOKENS_MEMBER, 20)  # inside the header's dict literal
    reseal_tokens(tokens)
    reseal_cache(cache, tokens)
    status, _, err = run_cli(capsys, "inspect-cache", str(cache))
    assert_one_line_error(status, err, shard.name, "sample 0")


def test_a_flipped_cache_member_is_named(pair, capsys):
    tokens, cache = pair
    shard = cache / _first_shard(tokens).name
    _flip_every_sample(shard, TARGETS_MEMBER, 40)  # inside the zstd frame
    reseal_cache(cache, tokens)
    status, _, err = run_cli(capsys, "inspect-cache", str(cache))
    assert_one_line_error(status, err, shard.name, "sample 0")


@pytest.mark.parametrize(
    ("which", "edit"),
    [
        ("tokens", lambda m: m["splits"]["train"]["shards"][0].update(samples=1)),
        ("tokens", lambda m: m["splits"]["train"].update(samples=3)),
        ("tokens", lambda m: m.update(seq_len=16)),
        ("tokens", lambda m: m.pop("fingerprint")),
        ("cache", lambda m: next(iter(m["shards"].values())).update(samples=1)),
        ("cache", lambda m: m["header"]["codec"].update(block=64)),
        ("cache", lambda m: m.pop("fingerprint")),
    ],
    ids=["tokens-shard-samples", "tokens-split-samples", "tokens-seq-len",
         "tokens-no-fingerprint", "cache-shard-samples", "cache-codec", "cache-no-fingerprint"],
)
def test_an_edited_manifest_field_is_refused(pair, capsys, which, edit):
    tokens, cache = pair
    path = (tokens if which == "tokens" else cache) / MANIFEST_NAME
    body = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body))
    status, _, err = run_cli(capsys, "inspect-cache", str(cache))
    assert_one_line_error(status, err, str(path), "fingerprint")


def test_non_utf8_manifest_is_one_line(pair, capsys):
    tokens, cache = pair
    flip(tokens / MANIFEST_NAME, 10)
    status, _, err = run_cli(capsys, "inspect-cache", str(cache))
    assert_one_line_error(status, err, str(tokens / MANIFEST_NAME), "not UTF-8")


def test_verify_exits_nonzero_on_an_incomplete_cache(pair, capsys):
    tokens, cache = pair
    body = json.loads((cache / MANIFEST_NAME).read_text())
    missing = sorted(body["shards"])[-1]
    del body["shards"][missing]  # as a run stopped before that shard committed leaves it
    (cache / missing).unlink()
    (cache / MANIFEST_NAME).write_text(json.dumps(body))
    reseal_cache(cache, tokens)
    status, out, err = run_cli(capsys, "inspect-cache", str(cache), "--verify")
    split = "eval" if missing.startswith("eval") else "train"
    assert_one_line_error(status, err, f"1 of", f"{split!r} shards are not cached", missing)
    assert f"PROBLEM  1 of" in out


def test_clean_copies_still_read(pair, capsys):
    """The control: the same copies, undamaged, verify and decode."""
    _, cache = pair
    status, out, err = run_cli(capsys, "inspect-cache", str(cache), "--verify")
    assert status == 0, err
    assert "PROBLEM" not in out and np.isfinite(json.loads(out.splitlines()[-2][9:])["support_mean"])
