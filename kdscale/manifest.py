"""The shared shape of kdscale's manifests: JSON with a format tag and a content fingerprint, plus
an append-only commit log, so that recording one more shard costs the same at any size.

    manifest.write(root)                 # manifest.json, atomically; folds (removes) the log
    manifest.commit(root, record)        # apply one record and append it to manifest.log: O(1)
    manifest = MyManifest.load(root)     # manifest.json, then every intact record of the log

``manifest.json`` is written atomically with its fingerprint beside its fields; loading checks
the format and that the stored fingerprint still matches the contents. The fingerprint covers
every field a reader trusts (all but ``UNSIGNED``: run statistics and where the inputs came
from), so a hand edit of a sample count, a shard size or a digest is caught, and so is a missing
fingerprint.

A writer that commits shard by shard appends one line per commit to ``manifest.log`` (the
record's JSON after a checksum of it) and fsyncs it, then folds the log into ``manifest.json``
when it is done. Readers accept both forms: the log's records are applied on top of
``manifest.json``. A torn last line (a crash mid-append) is detected by its checksum or missing
newline and ignored; a damaged line before the last is an error. Records are applied
idempotently, so a crash between writing ``manifest.json`` and removing the log is harmless.
The seal is in two parts, so that a commit stays O(1): ``manifest.json`` is checked against its
fingerprint, each record against its checksum, and every record is validated as it is applied;
:meth:`Manifest.write` folds the log and re-seals the whole with a fresh fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text, fsync_dir, read_json
from kdscale.logging import get_logger

MANIFEST_NAME = "manifest.json"
LOG_NAME = "manifest.log"
M = TypeVar("M", bound="Manifest")

log = get_logger(__name__)


def _checksum(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def _drop_torn_tail(fd: int, path: Path) -> None:
    """Cut a torn last line (no newline: the append of a killed writer) off the log."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    keep = size
    while keep > 0:
        start = max(keep - 4096, 0)
        block = os.pread(fd, keep - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        keep = start
    log.warning("%s: dropping a torn last record (%d bytes)", path, size - keep)
    os.ftruncate(fd, keep)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one checksummed record line to the commit log at ``path`` and fsync it."""
    payload = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    line = _checksum(payload).encode() + b" " + payload + b"\n"
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        _drop_torn_tail(fd, path)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The intact records of a commit log, in order (none if it does not exist)."""
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise KDScaleError(f"commit log {str(path)!r} cannot be read: {exc.strerror}") from None
    complete, tail = lines[:-1], lines[-1]  # the part after the last newline is torn (or empty)
    if tail:
        log.warning("%s: ignoring a torn last record (%d bytes, no newline)", path, len(tail))
    records = []
    for number, line in enumerate(complete, 1):
        digest, _, payload = line.partition(b" ")
        if digest.decode(errors="replace") != _checksum(payload):
            if number == len(complete) and not tail:
                log.warning("%s: ignoring a torn last record (checksum mismatch)", path)
                break
            raise KDScaleError(
                f"{path}: commit record {number} of {len(complete)} is damaged (checksum "
                "mismatch); the manifest cannot be trusted"
            )
        try:
            record = json.loads(payload)
        except ValueError:  # incl. UnicodeDecodeError: a checksummed line that is not JSON
            record = None
        if not isinstance(record, dict):
            raise KDScaleError(f"{path}: commit record {number} is not an object; the manifest "
                               "cannot be trusted")
        records.append(record)
    return records


class Manifest(BaseModel):
    """Base of the tokens and cache manifests. Subclasses set ``FORMAT`` and ``PRODUCER`` and
    say how a commit record changes them (:meth:`apply`)."""

    model_config = ConfigDict(extra="forbid")
    FORMAT: ClassVar[str]
    PRODUCER: ClassVar[str]  # the command that writes it, for error messages
    UNSIGNED: ClassVar[frozenset[str]] = frozenset()  # informational fields, not fingerprinted
    format: str

    @property
    def fingerprint(self) -> str:
        """sha256 of every field but ``UNSIGNED`` (canonical JSON): the identity of what the
        directory holds, and the seal that catches an edit."""
        body = self.model_dump(mode="json", exclude=set(self.UNSIGNED))
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one commit record into this manifest; applying it twice changes nothing."""
        raise NotImplementedError

    def commit(self, root: str | Path, record: dict[str, Any]) -> None:
        """Apply ``record`` and make it durable in the commit log (constant cost)."""
        self.apply(record)
        append_record(Path(root) / LOG_NAME, record)

    def write(self, root: str | Path) -> None:
        """Write ``manifest.json`` atomically, with the fingerprint, for humans and tools; the
        commit log, now folded into it, is removed."""
        body = self.model_dump(mode="json") | {"fingerprint": self.fingerprint}
        atomic_write_text(Path(root) / MANIFEST_NAME, json.dumps(body, indent=2) + "\n")
        commits = Path(root) / LOG_NAME
        if commits.exists():
            commits.unlink()
            fsync_dir(root)

    @classmethod
    def _check_format(cls, path: Path, found: Any) -> None:
        """A manifest of another format version is refused before its fields are read, saying
        whether an older or a newer kdscale wrote it."""
        if found == cls.FORMAT:
            return
        name, _, version = cls.FORMAT.rpartition("/")
        found_name, _, found_version = str(found).rpartition("/")
        if found_name == name and found_version.isdigit() and int(found_version) < int(version):
            raise KDScaleError(
                f"{path}: written by an older kdscale (format {found!r}; this one reads {cls.FORMAT!r}); "
                f"re-run `{cls.PRODUCER}` to rewrite it"
            )
        if found_name == name and found_version.isdigit():
            raise KDScaleError(f"{path}: written by a newer kdscale (format {found!r}); upgrade kdscale to read it")
        raise KDScaleError(f"{path}: format {found!r}, this kdscale reads {cls.FORMAT!r}")

    @classmethod
    def load(cls: type[M], root: str | Path) -> M:
        """Read and validate ``root/manifest.json`` plus its commit log; a clear error if
        missing or damaged."""
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise KDScaleError(f"{root}: no {MANIFEST_NAME}; is this the output of `{cls.PRODUCER}`?")
        body = read_json(path, "manifest")
        cls._check_format(path, body.get("format") if isinstance(body, dict) else None)
        try:
            stored = body.pop("fingerprint", None)
            manifest = cls.model_validate(body)
        except (ValidationError, AttributeError) as exc:
            raise KDScaleError(f"{path}: damaged manifest ({str(exc).splitlines()[0]})") from None
        if stored != manifest.fingerprint:
            raise KDScaleError(
                f"{path}: fingerprint {'is missing' if stored is None else 'does not match its contents'}"
                f" (edited or damaged since `{cls.PRODUCER}` wrote it); re-run `{cls.PRODUCER}`"
            )
        commits = Path(root) / LOG_NAME
        for record in read_records(commits):
            try:
                manifest.apply(record)
            except (ValueError, KeyError, TypeError) as exc:  # incl. pydantic's
                raise KDScaleError(f"{commits}: damaged record ({str(exc).splitlines()[0]})") from None
        return manifest
