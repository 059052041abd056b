"""`kdscale data` on a pool of workers, stopped by SIGKILL and resumed: always the same bytes.

Work units must cover every document once whatever their size; 1 and 3 workers must write
byte-identical shards; a run killed at a random shard resumes from its committed shards (which
are not rewritten) and ends byte-identical to an uninterrupted run, duplicate count included;
the duplicate-sample set must stay exact across its on-disk runs and a restore.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdscale.cli import main
from kdscale.data import seen as seen_module
from kdscale.data.manifest import TokensManifest, load_tokens_manifest
from kdscale.data.seen import SeenKeys
from kdscale.data.shards import TOKENS_MEMBER
from kdscale.data.sources import resolve_source
from kdscale.data.tarindex import index_shard
from kdscale.data.tokenizer import Tokenizer
from kdscale.data.units import plan_units, unit_documents
from kdscale.manifest import LOG_NAME

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("email", "json")
REPEATED = "The same paragraph, again and again: " + "spam and eggs " * 12


def stdlib_texts() -> list[str]:
    files = [f for p in PACKAGES for f in resolve_source(f"stdlib:python/{p}").files]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.fixture(scope="module")
def corpus(module_tmp_path: Path) -> dict[str, Path]:
    """The same documents as .jsonl (with runs of a repeated one), .parquet and .txt files."""
    root = module_tmp_path / "corpus"
    root.mkdir()
    texts = stdlib_texts()
    docs = [d for i, text in enumerate(texts) for d in ([text] + [REPEATED] * 6 * (i % 3 == 0))]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": texts[:12]}), root / "docs.parquet", row_group_size=2)
    (root / "txt").mkdir()
    for i, text in enumerate(texts[12:24]):
        (root / "txt" / f"{i:04d}.txt").write_text(text)
    return {"jsonl": root / "docs.jsonl", "parquet": root / "docs.parquet", "txt": root / "txt"}


def test_units_cover_every_document_once(corpus: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "megatron_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for n in range(1, 60):
        builder.add_document(torch.arange(n, dtype=torch.int32), [n])
    builder.finalize(f"{prefix}.idx")
    for spec in [*map(str, corpus.values()), str(prefix)]:
        source = resolve_source(spec)
        whole = plan_units([(source, None)], "text", 1 << 40)
        cut = plan_units([(source, None)], "text", 1000)
        assert len(whole) == 1 and len(cut) > 5, spec
        docs = [d for unit in whole for d in unit_documents(unit, "text")]
        pieces = [d for unit in cut for d in unit_documents(unit, "text")]
        assert len(pieces) == len(docs) and all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
                                                for a, b in zip(pieces, docs)), spec  # fmt: skip


def _args(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["data", "--input", str(corpus["jsonl"]), "--input", str(corpus["parquet"]), "--input",
            str(corpus["txt"]), "--seq-len", "32", "--shard-samples", "100", "--eval-fraction", "0.1",
            "--out", str(out), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(corpus: dict[str, Path], module_tmp_path: Path) -> Path:
    """The token set written in this process (one worker, default units: one per input)."""
    out = module_tmp_path / "reference"
    assert main(_args(corpus, out)) == 0
    return out


def shards(root: Path) -> dict[str, bytes]:
    manifest = load_tokens_manifest(root)
    return {s.name: (root / s.name).read_bytes() for split in manifest.splits.values() for s in split.shards}


def assert_same_token_set(got: Path, want: Path) -> None:
    a, b = load_tokens_manifest(got), load_tokens_manifest(want)
    assert a.fingerprint == b.fingerprint
    assert {k: v for k, v in a.stats.items() if k != "tokens_per_s"} == {
        k: v for k, v in b.stats.items() if k != "tokens_per_s"
    }
    assert shards(got) == shards(want)
    assert sorted(p.name for p in got.iterdir()) == sorted([*shards(want), "manifest.json", "config.yaml"])


def test_three_workers_write_the_same_bytes(corpus: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    assert main(_args(corpus, out, "--workers", "3", "--set", "data.unit_bytes=3000")) == 0
    assert_same_token_set(out, reference)
    manifest = load_tokens_manifest(reference)
    assert manifest.stats["duplicate_samples"] > 0 and manifest.splits["eval"].samples > 0
    keys = [k for s in shards(reference) for k in index_shard(reference / s, TOKENS_MEMBER, "shard").keys]
    assert len(keys) == len(set(keys))  # each sample once, over both splits


def test_sigkill_at_a_random_shard_resumes_to_the_same_bytes(
    corpus: dict[str, Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tokens"
    args = _args(corpus, out, "--workers", "2", "--set", "data.unit_bytes=5000")
    total = sum(len(split.shards) for split in load_tokens_manifest(reference).splits.values())
    seed = random.randrange(1 << 30)
    stop_after = random.Random(seed).randint(2, total // 2)  # kill once this many shards commit
    proc = subprocess.Popen([sys.executable, "-m", "kdscale.cli", *args], cwd=REPO)
    deadline = time.monotonic() + 240
    workers: list[psutil.Process] = []
    while not (out / LOG_NAME).is_file() or len((out / LOG_NAME).read_bytes().splitlines()) < stop_after:
        assert proc.poll() is None and time.monotonic() < deadline, f"seed {seed}"
        workers = workers or [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "tokenizer workers outlived their killed driver"
    stopped = TokensManifest.load(out)
    assert not stopped.complete, f"seed {seed}: the run finished before the kill"
    committed = {s.name: (out / s.name).stat() for split in stopped.splits.values() for s in split.shards}
    assert len(committed) >= stop_after
    assert main(["cache", "--tokens", str(out), "--out", str(tmp_path / "cache")]) == 2
    assert "incomplete token set" in capsys.readouterr().err
    assert main(args) == 0  # the same command resumes
    assert_same_token_set(out, reference)
    for name, before in committed.items():  # committed shards were kept, not rewritten
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert main(args) == 0  # complete: nothing to do
    assert_same_token_set(out, reference)


def test_seen_keys_stay_exact_across_runs_and_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seen_module, "RUN", 64)  # sorted runs after every 64 keys
    keys = [bytes(k) for k in np.random.default_rng(0).integers(0, 256, (1000, 16), dtype=np.uint8)]
    seen = SeenKeys(tmp_path, expected=10)  # a tiny filter: many false positives to resolve exactly
    seen.restore(0)
    assert all(seen.add(k) for k in keys[:500])
    assert not any(seen.add(k) for k in keys[:500:3])
    durable = seen.sync()
    assert all(seen.add(k) for k in keys[500:700])  # added after the resume point, then "killed"
    seen.close()
    resumed = SeenKeys(tmp_path, expected=10)
    resumed.restore(durable)
    assert len(list(tmp_path.glob("run-*.bin"))) == durable // 64
    assert all(resumed.add(k) for k in keys[500:1000])  # the later keys are new again
    assert not any(resumed.add(k) for k in keys[::7])
    resumed.close()


def test_tokenizer_travels_exactly() -> None:
    tokenizer = Tokenizer("smollm2-135m")
    texts = [t[:2000] for t in stdlib_texts()[:20]] + ["<|im_end|> special text", ""]
    encode = tokenizer.portable().load()
    assert all(np.array_equal(a, b) for a, b in zip(encode(texts), tokenizer.encode_batch(texts)))
