"""Load a tokenizer by fixture name, HF directory or kdscale model directory, fingerprint it, and
pick the document separator."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from kdscale.errors import KDScaleError
from kdscale.hub import resolve_tokenizer_dir
from kdscale.io import read_json


@dataclass(frozen=True)
class TokenizerInfo:
    """What the tokens manifest records about the tokenizer."""

    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int | None


def _model_eos_id(model_dir: Path) -> int | None:
    """The EOS id of the model's config (preferred over the tokenizer's: they can disagree), or
    of the token ids a kdscale model directory kept from it."""
    for name in ("config.json", "token_ids.json"):
        if (model_dir / name).is_file():
            body = read_json(model_dir / name, "model config")
            eos = body.get("eos_token_id") if isinstance(body, dict) else None
            return eos[0] if isinstance(eos, list) and eos else eos
    return None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the serialized vocabulary and merges (and added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        payload = {"model": spec.get("model"), "added_tokens": spec.get("added_tokens")}
    else:
        payload = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


class Tokenizer:
    """A Hugging Face tokenizer with the few operations the data stage needs."""

    def __init__(self, name_or_dir: str):
        from transformers import AutoTokenizer

        model_dir = resolve_tokenizer_dir(name_or_dir)
        if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise KDScaleError(
                f"data.tokenizer: cannot load a tokenizer from {str(model_dir)!r}: it has no "
                "tokenizer.json or tokenizer_config.json"
            )
        try:
            self._tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # transformers raises many types for unloadable dirs
            raise KDScaleError(f"data.tokenizer: cannot load a tokenizer from {str(model_dir)!r} ({exc})") from None
        eos_id = _model_eos_id(model_dir)
        if eos_id is None:
            eos_id = self._tok.eos_token_id
        self.info = TokenizerInfo(
            name=name_or_dir,
            fingerprint=tokenizer_fingerprint(self._tok),
            vocab_size=len(self._tok),
            eos_id=eos_id,
        )

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, without special tokens."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:  # fast path: Rust, parallel, no length warnings
            return encode_with_backend(backend, texts)
        ids = self._tok(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]

    def portable(self) -> "PortableEncoder":
        """What another process needs to encode exactly as :meth:`encode_batch` does."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        return PortableEncoder(self.info.name, backend.to_str() if backend is not None else None)


def encode_with_backend(backend: Any, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text by a ``tokenizers`` (Rust) tokenizer, without special tokens."""
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(enc.ids, dtype=np.int64) for enc in encodings]


@dataclass(frozen=True)
class PortableEncoder:
    """A tokenizer as it travels to a worker process: the fast tokenizer's own serialization,
    loaded there with the light ``tokenizers`` package (no transformers, no torch), or, for a
    slow tokenizer, its name."""

    name: str
    backend_json: str | None

    def load(self) -> Callable[[list[str]], list[np.ndarray]]:
        """``encode_batch`` of this tokenizer."""
        if self.backend_json is None:
            return Tokenizer(self.name).encode_batch
        from tokenizers import Tokenizer as RustTokenizer

        backend = RustTokenizer.from_str(self.backend_json)
        return lambda texts: encode_with_backend(backend, texts)
