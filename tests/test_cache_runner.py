"""`kdscale cache` on a real local Ray cluster: commits, resume, refusal to mix, faults, reader."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_cache import make_cache, make_tiny_teacher, make_tokens, reference_shards, shard_bytes
from kdscale.cache.manifest import load_cache_manifest
from kdscale.cache.reader import open_cache
from kdscale.cli import main
from kdscale.data.manifest import load_tokens_manifest
from kdscale.errors import KDScaleError


def test_cache_covers_every_sample_and_reads_back(tiny_tokens_dir: Path, tiny_cache_dir: Path) -> None:
    tokens = load_tokens_manifest(tiny_tokens_dir)
    manifest = load_cache_manifest(tiny_cache_dir)
    assert manifest.header.tokens_fingerprint == tokens.fingerprint
    assert manifest.header.vocab_size == 49152 and manifest.header.codec_params["k"] == 64
    assert set(manifest.shards) == {s.name for split in tokens.splits.values() for s in split.shards}
    cache = open_cache(tiny_cache_dir, vocab_size=49152, tokenizer_fingerprint=tokens.tokenizer_fingerprint, verify=True)
    for split, record in tokens.splits.items():
        items = list(cache.iter_split(split))
        assert len(items) == record.samples
        assert len({key for key, _, _ in items}) == record.samples  # every sample once
        for _key, ids, targets in items:
            assert ids.shape == (tokens.seq_len + 1,)
            assert targets.ids.shape == (1, tokens.seq_len, 64) and targets.kind == "topk"
            assert torch.all(targets.valid) and torch.all(targets.tail_logp <= 0)
    for record in manifest.shards.values():
        assert record.fidelity.positions > 0 and 0.5 < record.fidelity.covered_mass_mean <= 1.0
        assert record.fidelity.kl_mean is not None and record.fidelity.kl_mean >= 0


def test_rerun_resumes_and_a_changed_codec_is_refused(
    tmp_path: Path, tiny_tokens_dir: Path, tiny_teacher_dir: Path, tiny_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache_dir, cache)
    before = shard_bytes(cache)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")}
    make_cache(tiny_tokens_dir, cache, tiny_teacher_dir)  # nothing left to do
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")} == mtimes
    status = main(["cache", "--tokens", str(tiny_tokens_dir), "--out", str(cache), "--teacher", str(tiny_teacher_dir),
                   "--set", "cache.codec.k=16", "--set", "wandb.enabled=false"])
    err = capsys.readouterr().err
    assert status == 2 and "codec.k: 64 vs 16" in err and "cache.restart" in err
    assert shard_bytes(cache) == before  # refused: nothing touched
    make_cache(tiny_tokens_dir, cache, tiny_teacher_dir, "--set", "cache.codec.k=16", "--restart")
    assert load_cache_manifest(cache).header.codec_params["k"] == 16
    assert next(open_cache(cache).iter_split("train"))[2].ids.shape[-1] == 16


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _cache_command(tokens: Path, out: Path, teacher: Path | str) -> list[str]:
    return [sys.executable, "-m", "kdscale.cli", "cache", "--tokens", str(tokens), "--out", str(out),
            "--teacher", str(teacher), "--set", "cache.ray.num_cpus=2", "--set", "wandb.enabled=false",
            "--set", "cache.batch_size=1", "--set", "cache.splits=[train]"]


def _actor_pids() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "ray::CacheWorker" in line]


@pytest.fixture(scope="module")
def slow_setup(module_tmp_path: Path, smollm2_dir: Path) -> tuple[Path, Path]:
    """Seven shards and a 4-layer teacher: each shard takes long enough for a kill to land in it."""
    root = module_tmp_path
    tokens = make_tokens(root / "tokens", seq_len=64, shard_samples=8, source="stdlib:python/json/decoder.py")
    return tokens, make_tiny_teacher(root / "teacher", smollm2_dir, hidden=128, layers=4)


def test_worker_sigkill_mid_shard_completes_byte_identical(slow_setup: tuple[Path, Path], tmp_path: Path) -> None:
    tokens, teacher = slow_setup
    out = tmp_path / "cache"
    proc = subprocess.Popen(_cache_command(tokens, out, teacher), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(out.glob(".*.tmp")) and _actor_pids(), 120, "a shard in progress")
        for pid in _actor_pids():
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert not list(out.glob(".*.tmp"))
    got = shard_bytes(out)
    assert got == reference_shards(tokens, str(teacher), tmp_path / "ref", "cache.splits=[train]")


def test_driver_killed_then_same_command_resumes(slow_setup: tuple[Path, Path], tmp_path: Path) -> None:
    tokens, teacher = slow_setup
    out = tmp_path / "cache"
    command = _cache_command(tokens, out, teacher)
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: (out / "manifest.json").is_file() and load_cache_manifest(out).shards, 180, "one commit")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    committed = len(load_cache_manifest(out).shards)
    total = len(load_tokens_manifest(tokens).splits["train"].shards)
    assert 1 <= committed < total
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already committed" in done.stderr
    assert shard_bytes(out) == reference_shards(tokens, str(teacher), tmp_path / "ref", "cache.splits=[train]")


def test_corrupt_and_truncated_shards_are_named(tmp_path: Path, tiny_cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache_dir, cache)
    assert main(["inspect-cache", str(cache), "--verify"]) == 0
    report = capsys.readouterr().out
    assert "train" in report and "B/token" in report and "PROBLEM" not in report
    names = sorted(load_cache_manifest(cache).shards)
    flipped, truncated = cache / names[0], cache / names[1]
    blob = bytearray(flipped.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    flipped.write_bytes(bytes(blob))
    truncated.write_bytes(truncated.read_bytes()[:700])
    assert main(["inspect-cache", str(cache), "--verify", "--json"]) == 2
    captured = capsys.readouterr()
    problems = json.loads(captured.out)["problems"]
    assert any(names[0] in p and "corrupt" in p for p in problems)
    assert any(names[1] in p for p in problems) and names[1] in captured.err
    with pytest.raises(KDScaleError, match=names[0]):
        list(open_cache(cache, verify=True).iter_shard(names[0]))
    with pytest.raises(KDScaleError, match=names[1]):
        list(open_cache(cache).iter_shard(names[1]))  # even without sha256 checks


def test_mismatched_inputs_are_refused_naming_the_field(
    tmp_path: Path, tiny_tokens_dir: Path, tiny_cache_dir: Path, smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other_tokens = make_tokens(tmp_path / "other", seq_len=24)
    with pytest.raises(KDScaleError, match="tokens_fingerprint"):
        open_cache(tiny_cache_dir, other_tokens)
    with pytest.raises(KDScaleError, match="vocab_size: .* has 49152, expected 32000"):
        open_cache(tiny_cache_dir, vocab_size=32000)
    with pytest.raises(KDScaleError, match="tokenizer_fingerprint"):
        open_cache(tiny_cache_dir, tokenizer_fingerprint="0" * 64)
    # a teacher whose tokenizer differs from the one that made the tokens: refused before Ray starts
    teacher = make_tiny_teacher(tmp_path / "teacher", smollm2_dir)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 49152, "content": "<|extra|>"})
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    assert main(["cache", "--tokens", str(tiny_tokens_dir), "--out", str(tmp_path / "c"), "--teacher", str(teacher)]) == 2
    assert "tokenizer_fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_sampled_and_topp_caches(tmp_path: Path, tiny_tokens_dir: Path, tiny_teacher_dir: Path) -> None:
    for kind, extra in (("sampled", ["--set", "cache.codec.draws=50"]), ("topp", ["--set", "cache.codec.p=0.9"])):
        out = make_cache(tiny_tokens_dir, tmp_path / kind, tiny_teacher_dir, "--kind", kind, "--set", "cache.splits=[eval]", *extra)
        record = next(iter(load_cache_manifest(out).shards.values()))
        _, _, targets = next(open_cache(out).iter_split("eval"))
        assert targets.kind == kind
        if kind == "sampled":
            counts = torch.where(targets.valid, targets.logp.exp() * 50, 0.0).sum(-1)
            assert torch.allclose(counts, torch.full_like(counts, 50.0))  # N draws per position
            assert record.fidelity.kl_mean is None
        else:
            for _, _, targets in open_cache(out).iter_split("eval"):
                covered = torch.where(targets.valid, targets.logp.exp(), 0.0).sum(-1)
                full = targets.valid.sum(-1) == 64  # max_k reached before p
                assert torch.all((covered >= 0.9 - 1e-2) | full)
            assert np.isfinite(record.fidelity.kl_mean) and record.fidelity.support_mean < 64


# ------------------------------------------------------------------------- on the local cluster


@pytest.mark.multihost
def test_losing_a_worker_host_mid_cache_completes_byte_identical(
    local_cluster, slow_setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two actors on the two worker hosts; one host loses its link and every process (raylet,
    actor, all) mid-shard. Ray declares it dead, restarts its actor on the survivor and retries
    the shard: every sample exactly once, the bytes of an uninterrupted run."""
    tokens, teacher = slow_setup
    out = tmp_path / "cache"
    lost = local_cluster.hosts[2]
    command = [*_cache_command(tokens, out, teacher), "--ray-address", local_cluster.ray_address,
               "--set", "cache.ray.actors=2"]  # fmt: skip
    proc = subprocess.Popen(local_cluster.command_on(local_cluster.head, *command), stderr=subprocess.PIPE, text=True)
    try:
        def busy() -> bool:  # the lost host has committed a shard and is writing the next one
            done = (out / "manifest.json").is_file() and load_cache_manifest(out).shards
            return bool(done) and any(r.host == lost for r in done.values()) and any(out.glob(".*.tmp"))

        _wait_for(busy, 300, "a shard in progress on the worker hosts")
        before = load_cache_manifest(out).shards
        local_cluster.kill_host(lost)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
        local_cluster.restore()
    assert proc.returncode == 0, err[-3000:]
    shards = load_cache_manifest(out).shards
    after = [r.host for name, r in shards.items() if name not in before]
    assert after and set(after) == {local_cluster.hosts[1]}  # the survivor did the rest
    assert sum(r.host == lost for r in shards.values()) == sum(r.host == lost for r in before.values())
    keys = [key for key, _, _ in open_cache(out).iter_split("train")]
    assert len(keys) == len(set(keys)) == load_tokens_manifest(tokens).splits["train"].samples
    assert shard_bytes(out) == reference_shards(tokens, str(teacher), tmp_path / "ref", "cache.splits=[train]")


@pytest.mark.multihost
def test_a_dead_cluster_address_is_a_one_line_error(local_cluster, tiny_tokens_dir, tiny_teacher_dir, tmp_path, capsys) -> None:
    dead = "10.77.0.99:6390"  # on the cluster's subnet, no host there
    status = main(["cache", "--tokens", str(tiny_tokens_dir), "--out", str(tmp_path / "c"), "--teacher",
                   str(tiny_teacher_dir), "--ray-address", dead, "--set", "cache.ray.timeout_s=10"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert f"cache.ray.address={dead}: no Ray cluster answers there" in err


@pytest.mark.multihost
def test_actors_for_a_host_that_never_joined_are_a_one_line_error(local_cluster, tiny_tokens_dir, tiny_teacher_dir, tmp_path) -> None:
    """One actor more than there are worker hosts, each actor as big as a host: the last waits for
    a host that is not there, until cache.ray.timeout_s."""
    cpus = len(os.sched_getaffinity(0))  # what `ray start` gives each worker host
    workers = len(local_cluster.hosts) - 1
    command = [*_cache_command(tiny_tokens_dir, tmp_path / "c", tiny_teacher_dir), "--ray-address",
               local_cluster.ray_address, "--set", f"cache.ray.actors={workers + 1}",
               "--set", f"cache.ray.cpus_per_actor={cpus}", "--set", "cache.ray.timeout_s=5"]  # fmt: skip
    proc = local_cluster.run_on(local_cluster.head, *command, timeout=300)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("kdscale cache: error:")] == [
        f"kdscale cache: error: cache.ray: {workers + 1} actors of {{'CPU': {float(cpus)}}} found no room within "
        f"5 s on a cluster of {workers + 1} nodes with {{'CPU': {float(cpus * workers)}}} (a host that never "
        "joined?); lower cache.ray.actors or the resources per actor, or raise cache.ray.timeout_s"
    ]
