"""``kdscale inspect-cache DIR [--json] [--verify]``: what a cache holds and whether it is intact.

Prints the codec, teacher and token set, per split the shards, samples, tokens and bytes per
token, the fidelity recorded at write time (covered teacher mass, KL to the full teacher), the
covered-mass distribution over decoded sample positions, and a few decoded positions. With
``--verify`` every shard's sha256 is recomputed and every missing, uncommitted or corrupt shard
is named (exit status 2 if any: an incomplete cache does not verify).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdscale.cache.reader import open_cache
from kdscale.errors import ArgumentParser, KDScaleError, nonnegative_int
from kdscale.config.loader import RESOLVED_CONFIG_NAME
from kdscale.data.shards import shard_problems
from kdscale.io import read_yaml


def _intended_splits(cache_dir: Path, cache: Any) -> list[str]:
    """The splits the cache run was asked for (its config.yaml), else every split."""
    try:
        return list(read_yaml(cache_dir / RESOLVED_CONFIG_NAME, "config")["cache"]["splits"])
    except (KDScaleError, KeyError, TypeError):
        return list(cache.tokens.splits)


def _verify(cache_dir: Path, tokens_dir: Path, cache: Any) -> list[str]:
    problems = []
    wanted = _intended_splits(cache_dir, cache)
    for split, record in cache.tokens.splits.items():
        uncached = [s.name for s in record.shards if s.name not in cache.manifest.shards]
        if uncached and split in wanted:
            problems.append(
                f"{len(uncached)} of {len(record.shards)} {split!r} shards are not cached "
                f"(first: {uncached[0]}); run the same `kdscale cache` to finish"
            )
        problems += shard_problems(tokens_dir, record.shards, "token shard")
        cached = [cache.manifest.shards[s.name] for s in record.shards if s.name not in uncached]
        problems += shard_problems(cache_dir, cached, "cache shard")
    return problems


def summarize(cache_dir: str | Path, samples: int = 2, verify: bool = False) -> dict[str, Any]:
    """The report as a JSON-ready dict (``problems`` lists what ``verify`` found)."""
    cache = open_cache(cache_dir)
    header = cache.manifest.header
    report: dict[str, Any] = {
        "cache": str(cache_dir),
        "tokens": str(cache.tokens_root),
        "teacher": header.teacher,
        "teacher_fingerprint": header.teacher_fingerprint,
        "vocab_size": header.vocab_size,
        "codec": header.codec_params,
        "splits": {},
    }
    for split, token_split in cache.tokens.splits.items():
        records = [cache.manifest.shards[s.name] for s in token_split.shards if s.name in cache.manifest.shards]
        tokens = sum(r.tokens for r in records)
        positions = sum(r.fidelity.positions for r in records) or 1
        kl = [r.fidelity.kl_mean for r in records]
        report["splits"][split] = {
            "shards": len(token_split.shards),
            "committed": len(records),
            "samples": sum(r.samples for r in records),
            "tokens": tokens,
            "bytes": sum(r.bytes for r in records),
            "bytes_per_token": sum(r.bytes for r in records) / tokens if tokens else None,
            "covered_mass_mean": sum(r.fidelity.covered_mass_mean * r.fidelity.positions for r in records) / positions,
            "covered_mass_min": min((r.fidelity.covered_mass_min for r in records), default=None),
            "kl_mean": None if not kl or None in kl else sum(k * r.fidelity.positions for k, r in zip(kl, records)) / positions,
            "tv_mean": sum(r.fidelity.tv_mean * r.fidelity.positions for r in records) / positions,
            "quant_kl_mean": sum(r.fidelity.quant_kl_mean * r.samples for r in records) / max(sum(r.samples for r in records), 1),
            "support_mean": sum(r.fidelity.support_mean * r.fidelity.positions for r in records) / positions,
        }
    if not verify:
        report["samples"] = _decoded_samples(cache, samples)
        return report
    report["problems"] = _verify(Path(cache_dir), cache.tokens_root, cache)
    try:
        report["samples"] = _decoded_samples(cache, samples)
    except KDScaleError as exc:
        report["samples"] = []
        if not report["problems"]:  # a damage that sha256 cannot see (should not happen)
            report["problems"].append(str(exc))
    return report


def _decoded_samples(cache: Any, count: int) -> list[dict[str, Any]]:
    shown: list[dict[str, Any]] = []
    committed = [n for s in cache.tokens.splits.values() for n in (x.name for x in s.shards) if n in cache.manifest.shards]
    covered: list[torch.Tensor] = []
    for name in committed[:1]:
        for key, ids, targets in cache.iter_shard(name):
            if len(shown) == count:
                break
            mass = torch.where(targets.valid, targets.logp.exp(), 0.0).sum(-1)[0]
            covered.append(mass)
            first = [
                {"position": p, "label": int(ids[p + 1]), "top": _most_likely(targets, p, 3)}
                for p in range(min(3, targets.shape[1]))
            ]
            shown.append({"key": key, "support_mean": float(targets.valid.sum(-1).double().mean()), "positions": first})
    if covered:
        mass = torch.cat(covered).numpy()
        shown.append({"covered_mass_percentiles": dict(zip(("p5", "p50", "p95"), np.percentile(mass, [5, 50, 95]).round(4).tolist()))})
    return shown


def _most_likely(targets: Any, position: int, count: int) -> list[list[float]]:
    """``[id, logp]`` of the most likely kept ids (slot order differs between layouts)."""
    top = targets.logp[0, position].topk(min(count, targets.shape[2]))
    ids = targets.ids[0, position]
    return [[int(ids[j]), round(float(v), 4)] for v, j in zip(top.values, top.indices)]


def _print(report: dict[str, Any]) -> None:
    print(f"cache    {report['cache']}  (tokens: {report['tokens']})")
    print(f"teacher  {report['teacher']}  {report['teacher_fingerprint'][:40]}…  vocab {report['vocab_size']}")
    print("codec    " + ", ".join(f"{k}={v}" for k, v in report["codec"].items()))
    for split, s in report["splits"].items():
        bpt = f"{s['bytes_per_token']:.1f}" if s["bytes_per_token"] is not None else "-"
        kl = f"{s['kl_mean']:.2e}" if s["kl_mean"] is not None else "inf (sampled)"
        print(
            f"{split:<8} {s['committed']}/{s['shards']} shards, {s['samples']} samples, {s['tokens']} tokens, "
            f"{s['bytes']} bytes ({bpt} B/token); covered mass mean {s['covered_mass_mean']:.4f} "
            f"min {s['covered_mass_min']}; KL {kl} (quantization {s['quant_kl_mean']:.1e}); "
            f"TV {s['tv_mean']:.4f}; support {s['support_mean']:.1f}"
        )
    for sample in report["samples"]:
        print("sample   " + json.dumps(sample))
    for problem in report.get("problems", []):
        print(f"PROBLEM  {problem}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kdscale inspect-cache``."""
    parser = ArgumentParser(prog="kdscale inspect-cache", description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verify", action="store_true", help="re-check every shard's sha256")
    parser.add_argument("--samples", type=nonnegative_int, default=2, help="decoded samples to show")
    args = parser.parse_args(argv)
    report = summarize(args.cache_dir, args.samples, args.verify)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    if report.get("problems"):
        raise KDScaleError(f"{len(report['problems'])} problem(s): " + "; ".join(report["problems"]))
    return 0
