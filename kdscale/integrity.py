"""Checksums of a directory's files: recorded last when the directory is complete, checked before
anything in it is read.

    write_checksums(ckpt)                      # checksums.json: size + sha256 of every other file
    problems = verify_checksums(ckpt)          # [] when every file is there, unchanged, and alone

``checksums.json`` lives in the directory it describes (a checkpoint, a model directory, an HF
export) and lists every other regular file under it by relative path. A directory is intact
when it holds exactly those files with those sizes and sha256 digests: a truncated, flipped,
missing or added file is named. Files are hashed on a thread pool (hashlib releases the GIL),
and several processes can split the hashing of one directory (``share=(rank, world)``).
This guards against corruption, not against an attacker who rewrites ``checksums.json`` too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text, read_json, sha256_file

CHECKSUMS = "checksums.json"
FORMAT = "kdscale.checksums/1"
_BLOCK = 4 << 20


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def list_files(root: Path) -> tuple[list[str], list[str]]:
    """Relative paths of the regular files under ``root`` (``checksums.json`` excluded), and of
    any other entries that are not directories (links, sockets, ...); both sorted."""
    files, odd = [], []
    for parent, dirs, names in os.walk(root):
        base = Path(parent)
        for name in sorted(dirs):
            if (base / name).is_symlink():
                odd.append((base / name).relative_to(root).as_posix())
        for name in names:
            path = base / name
            relative = path.relative_to(root).as_posix()
            if relative == CHECKSUMS:
                continue
            (files if path.is_file() and not path.is_symlink() else odd).append(relative)
    return sorted(files), sorted(odd)


def digest_files(root: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` for files under ``root``, hashed in parallel."""
    names = list(names)

    def one(name: str) -> dict[str, Any]:
        path = root / name
        return {"bytes": path.stat().st_size, "sha256": sha256_file(path, _BLOCK)}

    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        return dict(zip(names, pool.map(one, names)))


def write_checksums(root: Path, known: dict[str, dict[str, Any]] | None = None) -> None:
    """Record every file under ``root`` in ``root/checksums.json`` (written last, atomically);
    ``known`` digests (e.g. hashed by other ranks) are reused, the rest are computed here."""
    known = dict(known or {})
    names, odd = list_files(root)
    assert not odd, f"{root}: not regular files: {odd}"
    known |= digest_files(root, [n for n in names if n not in known])
    body = {"format": FORMAT, "files": {name: known[name] for name in names}}
    atomic_write_text(root / CHECKSUMS, json.dumps(body, indent=1, sort_keys=True) + "\n")


def verify_checksums(root: Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of ``root`` against its ``checksums.json`` (empty: intact). Structure (missing,
    added or resized files) is checked in full; of the contents, this caller hashes the files
    ``share = (index, count)`` assigns to it (every ``count``-th, from ``index``)."""
    path = root / CHECKSUMS
    if not path.is_file():
        return [f"{path} is missing (written by a kdscale that did not record checksums, or "
                "removed)"]
    try:
        body = read_json(path, "checksum file")
    except KDScaleError as exc:
        return [str(exc)]
    recorded = body.get("files") if isinstance(body, dict) and body.get("format") == FORMAT else None
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        return [f"{path} is damaged (not a {FORMAT} file)"]
    names, odd = list_files(root)
    problems = [f"{root / name} is not a regular file" for name in odd]
    problems += [f"{root / name} is missing" for name in sorted(set(recorded) - set(names))]
    problems += [f"{root / name} is not in {CHECKSUMS}" for name in sorted(set(names) - set(recorded))]
    present = sorted(set(names) & set(recorded))
    for name in present:
        size, want = (root / name).stat().st_size, recorded[name].get("bytes")
        if size != want:
            problems.append(f"{root / name} is {size} bytes, {CHECKSUMS} says {want} (truncated or replaced)")
    if problems:
        return problems
    index, count = share
    mine = present[index::count]
    digests = digest_files(root, mine)
    return [
        f"{root / name} is corrupt (sha256 differs from {CHECKSUMS})"
        for name in mine
        if digests[name]["sha256"] != recorded[name].get("sha256")
    ]
