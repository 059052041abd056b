"""``kdscale cache``: a Ray actor pool runs the teacher over token shards and commits cache shards.

    kdscale cache --tokens runs/tokens --out runs/cache --set cache.codec.kind=sampled

Each teacher (``cache.ray.actors`` of them) is one Ray actor, or with
``cache.teacher.tensor_parallel``/``pipeline_parallel`` a group of T×P actors on one node
(:mod:`kdscale.cache.groups`); it loads once and takes one token shard at a time. The driver hands
out shards, records each committed shard (and the host that wrote it) in the manifest and shows
progress. A teacher one of whose actors dies, alone or with its host, is re-formed (elsewhere
when the host is gone) and its shard retried (``cache.ray.max_restarts``); a shard becomes
visible only by an atomic rename of a complete file, so it is committed exactly once. A cluster
address nobody answers at, or teachers the cluster has no room for, are a one-line error after
``cache.ray.timeout_s``; a group larger than any node is refused before anything starts. Running
the same command again resumes: committed shards are skipped. A cache made with another
codec, teacher, tokenizer or token set is refused unless ``cache.restart`` is set.

Before anything is written or started, :mod:`kdscale.cache.preflight` checks what would
otherwise fail only once the teacher runs; one driver holds ``cache.out/.lock`` while it runs
(removed when it ends). A local Ray instance listens on loopback only
(:mod:`kdscale.cache.local_ray`). A teacher actor that fails to start, or dies more often than
``cache.ray.max_restarts``, ends the run with one line; committed shards are kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any


from kdscale.cache.groups import TeacherGroup, close_groups, group_failed, place_groups, reform, start_groups
from kdscale.cache.manifest import CacheHeader, CacheManifest, CacheShardRecord, load_cache_manifest
from kdscale.cache.preflight import check_before_start
from kdscale.cache.writer import ShardTask
from kdscale.config import KDScaleConfig, write_resolved_config
from kdscale.config.cache import CacheConfig
from kdscale.data.manifest import TokensManifest, load_tokens_manifest
from kdscale.errors import KDScaleError, describe_failure
from kdscale.locks import exclusive_directory
from kdscale.logging import get_logger
from kdscale.progress import progress_bar
from kdscale.tracking import start_tracking

log = get_logger(__name__)


@contextlib.contextmanager
def _ray_session(cache: CacheConfig) -> Iterator[None]:
    """Attach to ``cache.ray.address`` or start a local Ray instance (loopback only) for this run."""
    import ray

    from kdscale.cache.local_ray import check_loopback, loopback_only

    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as local:
        if cache.ray.address:
            _check_reachable(cache.ray.address, cache.ray.timeout_s)
            try:
                ray.init(address=cache.ray.address, log_to_driver=True)
            except ConnectionError as exc:  # e.g. `auto` with no cluster on this machine
                raise KDScaleError(f"cache.ray.address={cache.ray.address}: {str(exc).splitlines()[0]}") from None
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            temp_dir = Path(cache.ray.temp_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "kdscale-ray")
            local.enter_context(loopback_only())
            ray.init(
                num_cpus=cache.ray.num_cpus,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                _temp_dir=str(temp_dir.resolve()),
                log_to_driver=True,
                configure_logging=False,
            )
        try:
            if not cache.ray.address:
                check_loopback(ray.util.get_node_ip_address())
            yield
        finally:
            ray.shutdown()


def _check_reachable(address: str, timeout: float) -> None:
    """A one-line error, within ``timeout`` s, when nothing listens at a cluster address
    (``ray.init`` would retry it for minutes)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise KDScaleError(f"cache.ray.address={address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise KDScaleError(
            f"cache.ray.address={address}: no Ray cluster answers there ({exc.strerror or exc}); "
            "start one (`ray start --head`) or fix the address"
        ) from None


def _tasks(tokens: TokensManifest, cache: CacheConfig, out: Path) -> list[ShardTask]:
    tasks = []
    for split in cache.splits:
        if split not in tokens.splits:
            raise KDScaleError(f"cache.splits: token set has no {split!r} split (have {', '.join(tokens.splits)})")
        for shard in tokens.splits[split].shards:
            tasks.append(
                ShardTask(
                    split=split,
                    token_path=str(Path(cache.tokens) / shard.name),
                    token_sha256=shard.sha256,
                    out_path=str(out / shard.name),
                    samples=shard.samples,
                    seq_len=tokens.seq_len,
                )
            )
    return tasks


def _header(tokens: TokensManifest, cache: CacheConfig, teacher_fingerprint: str, vocab_size: int) -> CacheHeader:
    from kdscale.cache.codec import codec_fingerprint, codec_params

    return CacheHeader(
        tokens_fingerprint=tokens.fingerprint,
        tokenizer_fingerprint=tokens.tokenizer_fingerprint,
        teacher=cache.teacher.model,
        teacher_fingerprint=teacher_fingerprint,
        vocab_size=vocab_size,
        codec_params=codec_params(cache.codec, vocab_size),
        codec_fingerprint=codec_fingerprint(cache.codec, vocab_size),
        codec=cache.codec.model_dump(mode="json"),
    )


def _refuse_to_mix(out: Path, existing: CacheManifest, header: CacheHeader) -> None:
    diffs = existing.header.differences(header)
    if diffs:
        raise KDScaleError(
            f"cache.out: {out} holds a cache made differently ({'; '.join(diffs)}); "
            "set cache.restart=true (--restart) to start over"
        )


def _existing_manifest(out: Path, tokens: TokensManifest, cache: CacheConfig) -> CacheManifest | None:
    """The manifest of a cache to resume, checked on everything knowable before the teacher loads
    (one with no committed shard holds nothing to protect: it never blocks another config)."""
    if not (out / "manifest.json").is_file() or cache.restart:
        return None
    existing = load_cache_manifest(out)
    if not existing.shards:
        return None
    old = existing.header
    _refuse_to_mix(out, existing, _header(tokens, cache, old.teacher_fingerprint, old.vocab_size))
    return existing


def _discard(out: Path) -> None:
    """``cache.restart``: remove an old cache's shards and manifest."""
    if (out / "manifest.json").is_file():
        old = load_cache_manifest(out)
        log.warning("cache.restart: discarding %d shards of the old cache in %s", len(old.shards), out)
        for name in old.shards:
            (out / name).unlink(missing_ok=True)
        (out / "manifest.json").unlink()


def _remove_stale_temps(out: Path) -> None:
    """Temp files of a killed run (never visible as shards) are deleted."""
    for stale in out.glob(".*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def run(cfg: KDScaleConfig) -> int:
    """Run the cache stage described by ``cfg.cache``; returns a process exit status."""
    from kdscale.data.tokenizer import Tokenizer
    from kdscale.teacher import teacher_tokenizer

    cache = cfg.cache
    if not cache.tokens or not cache.out:
        raise KDScaleError("cache.tokens and cache.out are required (e.g. --tokens runs/tokens --out runs/cache)")
    tokens = load_tokens_manifest(cache.tokens)
    teacher_tok = Tokenizer(teacher_tokenizer(cache.teacher)).info.fingerprint
    if teacher_tok != tokens.tokenizer_fingerprint:
        raise KDScaleError(
            f"tokenizer_fingerprint: the teacher's tokenizer ({teacher_tok[:12]}) differs from the one "
            f"that made {cache.tokens} ({tokens.tokenizer_fingerprint[:12]}); re-run `kdscale data` "
            "with the teacher's tokenizer"
        )
    check_before_start(cfg, tokens)
    out = Path(cache.out)
    with exclusive_directory(out, "cache.out", "kdscale cache"):
        existing = _existing_manifest(out, tokens, cache)
        if cache.restart:
            _discard(out)
        _remove_stale_temps(out)
        with _ray_session(cache):
            _cache_with_ray(cfg, tokens, out, existing)
        _remove_stale_temps(out)  # left by actors that died mid-shard and were retried
    return 0


def _cache_with_ray(cfg: KDScaleConfig, tokens: TokensManifest, out: Path, existing: CacheManifest | None) -> None:
    """Start the teachers, settle the header, and write every shard not yet committed."""
    cache = cfg.cache
    groups = place_groups(cache)
    try:
        _cache_with_groups(cfg, groups, tokens, out, existing)
    finally:
        close_groups(groups)


def _cache_with_groups(
    cfg: KDScaleConfig, groups: list[TeacherGroup], tokens: TokensManifest, out: Path, existing: CacheManifest | None
) -> None:
    cache = cfg.cache
    described = start_groups(groups, cache)
    teacher = described[0]
    if any(d != teacher for d in described[1:]):  # e.g. nodes that see different model files
        raise KDScaleError(f"teacher_fingerprint: the {len(groups)} teachers loaded different models: {described}")
    if teacher["vocab_size"] < tokens.vocab_size:
        raise KDScaleError(
            f"vocab_size: teacher has {teacher['vocab_size']} logits, tokens use {tokens.vocab_size} ids"
        )
    header = _header(tokens, cache, teacher["fingerprint"], teacher["vocab_size"])
    if existing is not None:
        _refuse_to_mix(out, existing, header)  # now with the teacher's own fingerprint
    manifest = existing or CacheManifest(header=header, tokens_dir=str(Path(cache.tokens).resolve()))
    todo = [t for t in _tasks(tokens, cache, out) if Path(t.out_path).name not in manifest.shards]
    write_resolved_config(cfg, out)
    manifest.write(out)
    log.info("cache %s: %d shards to write, %d already committed", out, len(todo), len(manifest.shards))
    tracker = start_tracking(cfg.wandb, "cache", out, cfg.model_dump(mode="json") | {"cache_header": header.model_dump()})
    try:
        _dispatch(groups, todo, manifest, cache, tracker)
    finally:
        tracker.finish()


def _dispatch(groups: list[TeacherGroup], todo: list[ShardTask], manifest: CacheManifest, cache: CacheConfig, tracker: Any) -> None:
    """Keep every teacher busy with one shard; record each shard as it commits. A teacher one of
    whose ranks died is re-formed and its shard retried (unless it was already committed)."""
    import ray

    out = Path(cache.out)
    queue = deque(todo)
    idle = list(groups)
    inflight: dict[Any, TeacherGroup] = {}
    start, tokens_done = time.perf_counter(), 0
    with progress_bar("caching", len(todo), "shard") as bar:
        while queue or inflight:
            while idle and queue:
                group = idle.pop()
                inflight |= dict.fromkeys(group.submit(queue.popleft()), group)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            group = inflight.pop(ref)
            group.waiting.discard(ref)
            try:
                record: CacheShardRecord | None = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                if not group_failed(exc, group):
                    raise _task_error(exc, group.task) from None
                for other in group.waiting:
                    inflight.pop(other, None)
                if group.record is None:
                    queue.appendleft(group.task)
                reform(group, exc, cache)
                idle.append(group)
                continue
            if record is not None:
                manifest.commit_shard(out, record)  # the commit point a resumed run trusts
                group.record = record
                tokens_done += record.tokens
                rate = tokens_done / max(time.perf_counter() - start, 1e-9)
                bar.update(1, tokens=record.tokens)
                tracker.log(
                    {
                        "cache/tokens_per_s": rate,
                        "cache/shards_committed": len(manifest.shards),
                        "cache/covered_mass_mean": record.fidelity.covered_mass_mean,
                        "cache/kl_mean": record.fidelity.kl_mean,
                        "cache/bytes_per_token": record.bytes / max(record.tokens, 1),
                    }
                )
            if not group.waiting:
                idle.append(group)
    manifest.write(out)  # fold the commit log into manifest.json
    log.info("cache %s: %d shards committed (%.0f tokens/s)", out, len(manifest.shards), tokens_done / max(time.perf_counter() - start, 1e-9))


def _task_error(exc: Exception, task: ShardTask | None) -> Exception:
    """A teacher's own error on a shard as one line (a KDScaleError, or an OSError such as a full
    disk, raised in the actor); anything else as it came."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, KDScaleError):
        return KDScaleError(str(cause).splitlines()[-1])
    if isinstance(cause, OSError) and task is not None:
        return KDScaleError(f"{task.out_path}: {describe_failure(cause)[0]}")
    return exc
