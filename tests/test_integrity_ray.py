"""`kdscale cache` on a local Ray instance, attacked and broken on purpose.

One real run caches a token directory whose last shard carries an extra ``<key>.pyd`` member
holding a pickle that would create a file if it were ever loaded (its manifest resealed, as
whoever hands over the shards can). While it runs, the listening TCP sockets of this process
and every process Ray started are sampled from /proc. A second run loses its only teacher actor
(SIGKILL, ``cache.ray.max_restarts=0``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers_integrity import (
    append_member,
    assert_one_line_error,
    descendants,
    is_loopback,
    listening_sockets,
    payload,
    reseal_tokens,
)

from kdscale.cache.manifest import load_cache_manifest
from kdscale.cli import main
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.shards import TOKENS_MEMBER
from kdscale.data.tarindex import index_shard


def _cache(tokens: Path, out: Path, teacher: Path, *sets: str) -> tuple[int, str]:
    """Run `kdscale cache` here, capturing what it writes to stderr."""
    argv = ["cache", "--tokens", str(tokens), "--out", str(out), "--teacher", str(teacher),
            "--set", "cache.ray.num_cpus=2", "--set", "wandb.enabled=false"]  # fmt: skip
    for item in sets:
        argv += ["--set", item]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


@pytest.fixture(scope="module")
def evil_run(module_tmp_path, tiny_tokens_dir, tiny_teacher_dir):
    root = module_tmp_path
    tokens, marker = root / "tokens", root / "executed"
    shutil.copytree(tiny_tokens_dir, tokens)
    last = tokens / load_tokens_manifest(tokens).splits["eval"].shards[-1].name
    key = index_shard(last, TOKENS_MEMBER, "token shard").keys[0]
    append_member(last, f"{key}.pyd", payload(marker))  # what webdataset's decoders unpickle
    reseal_tokens(tokens)
    before = set(listening_sockets([os.getpid()]).get(os.getpid(), []))
    seen: dict[int, set[str]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            me = os.getpid()
            for pid, found in listening_sockets([me, *descendants(me)]).items():
                seen.setdefault(pid, set()).update(a for a in found if pid != me or a not in before)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        status, err = _cache(tokens, root / "cache", tiny_teacher_dir)
    finally:
        done.set()
        sampler.join()
    return {"status": status, "err": err, "seen": seen, "marker": marker, "shard": last,
            "tokens": tokens, "out": root / "cache"}  # fmt: skip


def test_every_listener_of_a_local_ray_instance_is_on_loopback(evil_run):
    listening = {pid: sorted(found) for pid, found in evil_run["seen"].items() if found}
    assert len(listening) >= 3, listening  # at least the driver, GCS and raylet listen
    exposed = {pid: [a for a in found if not is_loopback(a)] for pid, found in listening.items()}
    assert not any(exposed.values()), exposed


def test_a_foreign_pickle_member_in_a_token_shard_is_refused_unread(evil_run):
    assert_one_line_error(evil_run["status"], evil_run["err"], evil_run["shard"].name, ".pyd'",
                          "not a kdscale token shard member")  # fmt: skip
    assert not evil_run["marker"].exists()  # the pickle never ran
    tokens = load_tokens_manifest(evil_run["tokens"])
    committed = load_cache_manifest(evil_run["out"]).shards
    assert len(committed) == sum(len(s.shards) for s in tokens.splits.values()) - 1
    assert not (evil_run["out"] / ".lock").exists()


def test_a_teacher_actor_out_of_restarts_ends_the_run_in_one_line(
    tmp_path, tiny_tokens_dir, tiny_teacher_dir
):
    killed: list[int] = []

    def kill_the_actor() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            for pid in descendants(os.getpid()):
                with contextlib.suppress(OSError):
                    if b"CacheWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_actor, daemon=True)
    killer.start()
    status, err = _cache(tiny_tokens_dir, tmp_path / "cache", tiny_teacher_dir,
                         "cache.ray.max_restarts=0")  # fmt: skip
    killer.join()
    assert killed
    assert_one_line_error(status, err, "teacher actor", "cache.ray.max_restarts=0")
    assert "ActorDiedError" not in err
    assert not (tmp_path / "cache" / ".lock").exists()
