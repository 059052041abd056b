"""The shared shape of kdscale's manifests: JSON with a format tag and a content fingerprint.

A manifest is written atomically with its fingerprint beside its fields; loading checks the
format and that the stored fingerprint still matches the contents. The fingerprint covers every
field a reader trusts (all but ``UNSIGNED``: run statistics and where the inputs came from), so
a hand edit of a sample count, a shard size or a digest is caught, and so is a missing
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text, read_json

MANIFEST_NAME = "manifest.json"
M = TypeVar("M", bound="Manifest")


class Manifest(BaseModel):
    """Base of the tokens and cache manifests. Subclasses set ``FORMAT`` and ``PRODUCER``."""

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

    def write(self, root: str | Path) -> None:
        """Write ``manifest.json`` atomically, with the fingerprint, for humans and tools."""
        body = self.model_dump(mode="json") | {"fingerprint": self.fingerprint}
        atomic_write_text(Path(root) / MANIFEST_NAME, json.dumps(body, indent=2) + "\n")

    @classmethod
    def load(cls: type[M], root: str | Path) -> M:
        """Read and validate ``root/manifest.json``; a clear error if missing or damaged."""
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise KDScaleError(f"{root}: no {MANIFEST_NAME}; is this the output of `{cls.PRODUCER}`?")
        body = read_json(path, "manifest")
        try:
            stored = body.pop("fingerprint", None)
            manifest = cls.model_validate(body)
        except (ValidationError, AttributeError) as exc:
            raise KDScaleError(f"{path}: damaged manifest ({str(exc).splitlines()[0]})") from None
        if manifest.format != cls.FORMAT:
            raise KDScaleError(f"{path}: format {manifest.format!r}, this kdscale reads {cls.FORMAT!r}")
        if stored != manifest.fingerprint:
            raise KDScaleError(
                f"{path}: fingerprint {'is missing' if stored is None else 'does not match its contents'}"
                f" (edited or damaged since `{cls.PRODUCER}` wrote it); re-run `{cls.PRODUCER}`"
            )
        return manifest
