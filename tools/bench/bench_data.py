"""Benchmark the data side at pretraining scale: manifest commits, tokenizer workers, streaming.

    .venv/bin/python tools/bench/bench_data.py                      # commits + workers (minutes)
    .venv/bin/python tools/bench/bench_data.py --stream-gb 2        # + a 2 GB .jsonl and .parquet

Prints JSON lines:

- ``commit``: seconds per shard commit (median of ``--commits``) into a tokens and a cache
  manifest that already hold 100, 10,000 and 100,000 shards (goal: the 100,000 figure ≤ 2× the
  100 figure), wall (mostly the log's fsync, at the mercy of the shared disk) and the driver's
  CPU, next to what rewriting the whole manifest costs at that size (what every commit cost
  before the commit log);
- ``workers``: `kdscale data` tokens/s with ``data.workers`` = 1 and 2 on the same generated
  .jsonl (``--mb`` of stdlib text), the CPU seconds they took (driver and workers), the load
  average (the machine may be shared), and the ratio; the shards must be byte-identical.
  With one worker the driver tokenizes itself, and the Rust tokenizer may use every core;
  workers are single-threaded each;
- ``stream`` (with ``--stream-gb``): a generated .jsonl (documents of random real words) and
  the same as .parquet (row groups of about 50 MB) tokenized by `kdscale data` in a subprocess;
  peak RSS of the whole process tree (driver + workers, sampled every 0.2 s; the sum counts
  pages the processes share once per process), its peak PSS (shared pages split between the
  processes: the tree's real footprint) and the driver's RSS alone (goal: < 1 GB). ``--stream-seconds`` stops each run (SIGKILL) after that long and
  reports the units it had finished (``progress.json``) out of the input's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kdscale.cache.manifest import CacheHeader, CacheManifest, CacheShardRecord, Fidelity  # noqa: E402
from kdscale.cli import main as kdscale  # noqa: E402
from kdscale.config.data import DataConfig  # noqa: E402
from kdscale.data.builder import DataProgress  # noqa: E402
from kdscale.data.manifest import ShardRecord, SplitRecord, TokensManifest, load_tokens_manifest  # noqa: E402
from kdscale.data.sources import resolve_source  # noqa: E402
from kdscale.data.units import plan_units  # noqa: E402

FIDELITY = Fidelity(positions=4096, covered_mass_mean=0.93, covered_mass_min=0.41, kl_mean=0.012,
                    kl_max=0.9, tv_mean=0.05, support_mean=64.0, quant_kl_mean=1e-4)  # fmt: skip


def _token_shard(i: int) -> ShardRecord:
    return ShardRecord(name=f"train-{i:06d}.tar", samples=1024, bytes=8_500_000, sha256=f"{i:064x}")


def _cache_shard(i: int) -> CacheShardRecord:
    return CacheShardRecord(name=f"train-{i:06d}.tar", split="train", token_shard=f"train-{i:06d}.tar",
                            samples=1024, tokens=2_097_152, bytes=90_000_000, sha256=f"{i:064x}",
                            fidelity=FIDELITY)  # fmt: skip


def _manifests(shards: int) -> dict[str, tuple[object, object]]:
    """A tokens and a cache manifest holding ``shards`` shards, and how to commit one more."""
    tokens = TokensManifest(
        tokenizer="smollm2-135m", tokenizer_fingerprint="f" * 64, vocab_size=49152, eos_id=2,
        separator="eos", seq_len=2048, dtype="<u2", splits={"train": SplitRecord(), "eval": SplitRecord()},
        stats={}, inputs=["corpus.jsonl"], complete=False,
    )  # fmt: skip
    for i in range(shards):
        tokens.apply({"split": "train", "index": i, "shard": _token_shard(i).model_dump()})
    header = CacheHeader(tokens_fingerprint="a" * 64, tokenizer_fingerprint="f" * 64, teacher="t",
                         teacher_fingerprint="b" * 64, vocab_size=49152, codec_params={"k": 64},
                         codec_fingerprint="c" * 64, codec={"kind": "topk", "k": 64})  # fmt: skip
    cache = CacheManifest(header=header, tokens_dir="/tokens")
    for i in range(shards):
        cache.apply(_cache_shard(i).model_dump(mode="json"))
    return {
        "tokens": (tokens, lambda root, i: tokens.commit_shard(root, "train", _token_shard(i))),
        "cache": (cache, lambda root, i: cache.commit_shard(root, _cache_shard(i))),
    }


def bench_commits(sizes: list[int], commits: int) -> None:
    """Commits into manifests of every size, interleaved, so that all sizes share the machine's noise."""
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        runs = {}
        for size in sizes:
            for kind, (manifest, commit) in _manifests(size).items():
                root = Path(tmp) / f"{kind}-{size}"
                root.mkdir()
                start = time.perf_counter()
                manifest.write(root)  # the fold; before the commit log, every commit did this
                runs[kind, size] = (manifest, commit, root, time.perf_counter() - start, [], [])
        os.sync()  # the folds' pages are not the commits' to flush
        for i in range(commits):
            for (_, size), (_, commit, root, _, wall, cpu) in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                commit(root, size + i)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        medians: dict[str, dict[int, tuple[float, float]]] = {"tokens": {}, "cache": {}}
        for (kind, size), (manifest, _, root, rewrite, wall, cpu) in runs.items():
            assert type(manifest).load(root).fingerprint == manifest.fingerprint
            medians[kind][size] = (statistics.median(wall), statistics.median(cpu))
            print(json.dumps({"bench": "commit", "manifest": kind, "shards": size, "commits": commits,
                              "commit_s_median": round(statistics.median(wall), 6),
                              "commit_s_p90": round(sorted(wall)[int(0.9 * len(wall))], 6),
                              "commit_cpu_s_median": round(statistics.median(cpu), 6),
                              "rewrite_s": round(rewrite, 4)}), flush=True)  # fmt: skip
    for kind, by_size in medians.items():
        small, large = min(by_size), max(by_size)
        print(json.dumps({"bench": "commit", "manifest": kind,
                          f"ratio_{large}_vs_{small}": round(by_size[large][0] / by_size[small][0], 2),
                          f"cpu_ratio_{large}_vs_{small}": round(by_size[large][1] / by_size[small][1], 2),
                          "goal": "<= 2"}), flush=True)  # fmt: skip


def _stdlib_jsonl(path: Path, megabytes: float) -> None:
    """Real text (the standard library's sources) as .jsonl documents, repeated to size."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in resolve_source("stdlib:python").files]
    written, target = 0, int(megabytes * 1e6)
    with open(path, "w") as handle:
        for copy in range(1 << 20):
            for text in texts:
                line = json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n"
                handle.write(line)
                written += len(line)
                if written >= target:
                    return


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_workers(megabytes: float, workers: list[int]) -> None:
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        _stdlib_jsonl(corpus, megabytes)
        rates, fingerprints = {}, set()
        for n in workers:
            out = Path(tmp) / f"tokens-{n}"
            start, cpu = time.perf_counter(), _cpu_seconds()
            assert kdscale(["data", "--input", str(corpus), "--seq-len", "2048", "--out", str(out),
                            "--workers", str(n), "--set", "data.unit_bytes=1000000"]) == 0  # fmt: skip
            cpu = _cpu_seconds() - cpu
            manifest = load_tokens_manifest(out)
            rates[n] = manifest.stats["tokens_per_s"]
            fingerprints.add(manifest.fingerprint)
            print(json.dumps({"bench": "workers", "workers": n, "megabytes": megabytes,
                              "tokens": manifest.stats["tokens"], "tokens_per_s": rates[n],
                              "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1),
                              "tokens_per_cpu_s": round(manifest.stats["tokens"] / cpu),
                              "load_average": round(os.getloadavg()[0], 1)}), flush=True)  # fmt: skip
        assert len(fingerprints) == 1, "the token sets differ between worker counts"
        print(json.dumps({"bench": "workers", "ratio": {f"{n}/{workers[0]}": round(rates[n] / rates[workers[0]], 2)
                                                        for n in workers[1:]}, "byte_identical": True}))  # fmt: skip


def _random_words_jsonl(path: Path, gigabytes: float, seed: int = 0) -> int:
    """``gigabytes`` of documents of random real words (a stand-in web corpus); returns bytes."""
    text = " ".join(f.read_text(errors="replace") for f in resolve_source("stdlib:python/email").files)
    words = np.array(sorted(set(re.findall(r"[A-Za-z]{2,12}", text))))
    rng = np.random.default_rng(seed)
    written, target = 0, int(gigabytes * 1e9)
    with open(path, "w") as handle:
        while written < target:
            lengths = rng.integers(50, 3000, 256)
            picks = words[rng.integers(0, len(words), int(lengths.sum()))]
            chunk = "".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in np.split(picks, np.cumsum(lengths)[:-1]))
            handle.write(chunk)
            written += len(chunk)
    return written


def _jsonl_to_parquet(jsonl: Path, parquet: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(parquet, schema) as writer, open(jsonl) as handle:
        batch = []
        for line in handle:
            batch.append(json.loads(line)["text"])
            if len(batch) == 5_000:  # row groups of about 50 MB
                writer.write_table(pa.table({"text": batch}, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.table({"text": batch}, schema=schema))


def _peak_rss(command: list[str], seconds: float) -> dict[str, float]:
    """Run ``command``; peak RSS of its process tree and of its root; SIGKILL after ``seconds``."""
    import psutil

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    tree_peak = driver_peak = tree_pss_peak = 0
    deadline = time.monotonic() + (seconds or float("inf"))
    while proc.poll() is None:
        if time.monotonic() > deadline:
            procs = [root, *root.children(recursive=True)]
            for p in procs:
                p.kill()
            proc.wait()
            break
        try:
            procs = [root, *root.children(recursive=True)]
            memory = [p.memory_full_info() for p in procs]
        except psutil.NoSuchProcess:
            continue
        rss = [m.rss for m in memory]
        tree_peak, driver_peak = max(tree_peak, sum(rss)), max(driver_peak, rss[0])
        tree_pss_peak = max(tree_pss_peak, sum(m.pss for m in memory))
        time.sleep(0.2)
    else:
        assert proc.returncode == 0, f"{command} failed"
    return {"tree_rss_gib": round(tree_peak / 2**30, 3), "tree_pss_gib": round(tree_pss_peak / 2**30, 3),
            "driver_rss_gib": round(driver_peak / 2**30, 3)}  # fmt: skip


def _done(out: Path, path: Path) -> dict[str, object]:
    """How far the run of ``path`` into ``out`` got: all of it, or the units of a stopped run."""
    manifest = TokensManifest.load(out)
    if manifest.complete:
        return {"finished": True, "tokens": manifest.stats["tokens"], "tokens_per_s": manifest.stats["tokens_per_s"]}
    progress = DataProgress.load(out)  # None: stopped before its first unit finished
    done, tokens = (progress.units_done, progress.tokens) if progress else (0, 0)
    units = plan_units([(resolve_source(str(path)), None)], "text", DataConfig().unit_bytes)
    return {"finished": False, "units_done": done, "units": len(units), "tokens": tokens}


def bench_stream(gigabytes: float, workers: int, formats: list[str], seconds: float) -> None:
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        jsonl = Path(tmp) / "web.jsonl"
        size = _random_words_jsonl(jsonl, gigabytes)
        parquet = Path(tmp) / "web.parquet"
        if "parquet" in formats:
            _jsonl_to_parquet(jsonl, parquet)
        for path in [Path(tmp) / f"web.{f}" for f in formats]:
            out = Path(tmp) / f"tokens-{path.suffix[1:]}"
            command = [sys.executable, "-m", "kdscale.cli", "data", "--input", str(path), "--seq-len", "2048",
                       "--workers", str(workers), "--out", str(out)]  # fmt: skip
            start = time.perf_counter()
            peaks = _peak_rss(command, seconds)
            print(json.dumps({"bench": "stream", "input": path.suffix[1:], "input_gb": round(path.stat().st_size / 1e9, 2),
                              "generated_jsonl_gb": round(size / 1e9, 2), "workers": workers,
                              **_done(out, path), "wall_s": round(time.perf_counter() - start, 1),
                              **peaks, "goal": "< 1 GiB"}), flush=True)  # fmt: skip
            shutil.rmtree(out)  # room for the next input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--commits", type=int, default=200, help="commits timed per manifest size")
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text for the workers run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stream-gb", type=float, default=0.0, help="size of the streaming run (0: skip)")
    parser.add_argument("--stream-workers", type=int, default=2)
    parser.add_argument("--stream-seconds", type=float, default=0.0, help="stop each streaming run after (0: never)")
    parser.add_argument("--stream-formats", nargs="+", default=["jsonl", "parquet"], choices=["jsonl", "parquet"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["commit", "workers"])
    args = parser.parse_args()
    (REPO / ".cache").mkdir(exist_ok=True)
    if "commit" not in args.skip:
        bench_commits(args.shards, args.commits)
    if "workers" not in args.skip:
        bench_workers(args.mb, args.workers)
    if args.stream_gb:
        bench_stream(args.stream_gb, args.stream_workers, args.stream_formats, args.stream_seconds)


if __name__ == "__main__":
    main()
