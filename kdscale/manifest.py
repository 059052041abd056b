"""The shared shape of kdscale's manifests: JSON with a format tag and a content fingerprint.

A manifest is written atomically with its fingerprint beside its fields; loading checks the
format and that the stored fingerprint still matches the contents (a hand edit is caught).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text

MANIFEST_NAME = "manifest.json"
M = TypeVar("M", bound="Manifest")


class Manifest(BaseModel):
    """Base of the tokens and cache manifests. Subclasses set ``FORMAT`` and ``PRODUCER``."""

    model_config = ConfigDict(extra="forbid")
    FORMAT: ClassVar[str]
    PRODUCER: ClassVar[str]  # the command that writes it, for error messages
    format: str

    @property
    def fingerprint(self) -> str:
        """A digest of the contents that matter (defined by each subclass)."""
        raise NotImplementedError

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
        try:
            body = json.loads(path.read_text())
            stored = body.pop("fingerprint", None)
            manifest = cls.model_validate(body)
        except (json.JSONDecodeError, ValidationError, AttributeError) as exc:
            raise KDScaleError(f"{path}: damaged manifest ({str(exc).splitlines()[0]})") from None
        if manifest.format != cls.FORMAT:
            raise KDScaleError(f"{path}: format {manifest.format!r}, this kdscale reads {cls.FORMAT!r}")
        if stored is not None and stored != manifest.fingerprint:
            raise KDScaleError(f"{path}: fingerprint does not match its contents (edited by hand?)")
        return manifest
