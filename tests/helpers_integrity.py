"""Shared pieces of the integrity tests: damaging real files, a pickle that leaves a trace if it is
ever run, the listening sockets of a process tree, and the one-line-error check."""

from __future__ import annotations

import io
import ipaddress
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

from kdscale.cache.manifest import CacheManifest, load_cache_manifest
from kdscale.cli import main
from kdscale.data.manifest import TokensManifest, load_tokens_manifest
from kdscale.io import sha256_file
from kdscale.manifest import MANIFEST_NAME


class Touch:
    """Unpickling this calls ``Path(marker).touch()``: proof that a file's pickle was run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (Path.touch, (self.marker,))


def payload(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded."""
    return pickle.dumps(Touch(marker))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``kdscale ARGV`` in this process: exit status, stdout, stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *expected: str) -> str:
    """The command failed with status 2, said so in exactly one ``error:`` line holding every
    ``expected`` text, and printed no traceback; returns that line."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def flip(path: Path, offset: int, count: int = 1, stride: int = 1) -> None:
    """Invert ``count`` bytes of ``path`` from ``offset`` on, ``stride`` apart."""
    blob = bytearray(path.read_bytes())
    for i in range(count):
        blob[(offset + i * stride) % len(blob)] ^= 0xFF
    path.write_bytes(bytes(blob))


def append_member(shard: Path, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    """Add one entry to a tar shard (as someone handing over a token directory could)."""
    with tarfile.open(shard, "a:") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def reseal_tokens(root: Path) -> None:
    """Rewrite a token directory's manifest to match its (edited) shards, as whoever supplies the
    shards can: sizes, sha256s and the fingerprint all agree again."""
    body = json.loads((root / MANIFEST_NAME).read_text())
    body.pop("fingerprint")
    for split in body["splits"].values():
        for shard in split["shards"]:
            shard["sha256"] = sha256_file(root / shard["name"])
            shard["bytes"] = (root / shard["name"]).stat().st_size
    TokensManifest.model_validate(body).write(root)
    load_tokens_manifest(root)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{'.'.join(str(b) for b in raw[::-1])}:{int(port, 16)}"
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # four little-endian 32-bit words
    return f"[{ipaddress.IPv6Address(b''.join(words))}]:{int(port, 16)}"


def listening_sockets(pids: list[int]) -> dict[int, list[str]]:
    """``pid -> ["ip:port", ...]`` of the TCP sockets each process listens on."""
    owner: dict[int, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owner[int(target[8:-1])] = pid
        except OSError:
            continue  # the process ended meanwhile
    found: dict[int, list[str]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in owner:  # 0A: LISTEN
                found.setdefault(owner[int(fields[9])], []).append(_address(fields[1]))
    return found


def is_loopback(address: str) -> bool:
    """``ip:port`` on 127.0.0.0/8, ::1 or an IPv4-mapped loopback address."""
    host = address.rsplit(":", 1)[0].strip("[]")
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def reseal_cache(cache: Path, tokens: Path) -> None:
    """Rewrite a cache manifest to match its (edited) shards and token set, as whoever supplies
    both directories can."""
    body = json.loads((cache / MANIFEST_NAME).read_text())
    body.pop("fingerprint")
    body["header"]["tokens_fingerprint"] = load_tokens_manifest(tokens).fingerprint
    body["tokens_dir"] = str(tokens)
    for name, record in body["shards"].items():
        record["sha256"] = sha256_file(cache / name)
        record["bytes"] = (cache / name).stat().st_size
    CacheManifest.model_validate(body).write(cache)
    load_cache_manifest(cache)


def copy_pair(tokens: Path, cache: Path, root: Path) -> tuple[Path, Path]:
    """Copies of a token directory and its cache, the cache pointing at the copied tokens."""

    shutil.copytree(tokens, root / "tokens")
    shutil.copytree(cache, root / "cache")
    reseal_cache(root / "cache", root / "tokens")
    return root / "tokens", root / "cache"
