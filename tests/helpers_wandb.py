"""Read what W&B wrote offline: the records of ``run-*.wandb`` files (a LevelDB-style log).

The Python reader W&B once shipped is gone (its writer is in Go now), so this decodes the
documented framing: a 7-byte file header, then 32 KiB blocks of records, each ``crc32 (4) |
length (2) | type (1) | payload``, where type 1 is a whole record and 2/3/4 the first, middle
and last pieces of one that spans blocks. Each record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FILE_HEADER = 7
RECORD_HEADER = 7


def _payloads(data: bytes) -> Iterator[bytes]:
    pos, pieces = FILE_HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER:
            pos += room  # block trailer: padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        payload = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == 0:  # zero padding
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            pieces = payload
        elif kind == 3:
            pieces += payload
        elif kind == 4:
            yield pieces + payload


def read_run(path: Path) -> dict[str, Any]:
    """One offline run: its group, job type, name, config keys and artifacts."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"artifacts": [], "config": {}}
    for payload in _payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"group": record.run.run_group, "job_type": record.run.job_type,
                    "name": record.run.display_name}  # fmt: skip
            run["config"] |= {item.key: item.value_json for item in record.run.config.update}
        elif kind == "config":
            run["config"] |= {item.key: item.value_json for item in record.config.update}
        elif kind == "artifact":
            art = record.artifact
            files = [entry.path for entry in art.manifest.contents]
            run["artifacts"].append({"name": art.name, "type": art.type, "files": files})
    return run


def read_runs(wandb_dir: Path) -> list[dict[str, Any]]:
    """Every offline run under ``wandb_dir`` (``.../wandb/offline-run-*/run-*.wandb``)."""
    return [read_run(p) for p in sorted(wandb_dir.glob("offline-run-*/run-*.wandb"))]
