"""The teacher protocol: token batches in, next-token log-probabilities out, chunk by chunk.

A backend runs the model body once over ``[B, S]`` tokens and then applies the output layer
and log-softmax to one block of ``chunk`` positions at a time, so peak memory holds a single
``[B, chunk, V]`` float32 block rather than ``[B, S, V]``. Two backends implement it: a Hugging
Face causal LM (:mod:`kdscale.teacher.hf`) and a kdscale megatron-core checkpoint
(:mod:`kdscale.teacher.megatron`), in one process or as one rank of a tensor × pipeline group.
A rank of a tensor-parallel teacher yields only its vocabulary shard ``[B, chunk, V/T]`` (already
normalized over the whole vocabulary) and describes it by a :class:`VocabShard`; a rank of an
earlier pipeline stage yields nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from kdscale.errors import KDScaleError


@dataclass(frozen=True)
class VocabShard:
    """Which columns of the output distribution one tensor rank holds: ids ``offset ..
    offset + V/size`` of ``vocab``; ``group`` is the tensor ranks' process group (the one the
    sparsifier reduces over)."""

    group: Any
    size: int
    offset: int
    vocab: int


@runtime_checkable
class Teacher(Protocol):
    """What the cache stage needs from a teacher model."""

    @property
    def vocab_size(self) -> int:
        """Width ``V`` of the output distribution (the output layer's rows)."""
        ...

    @property
    def vocab_shard(self) -> VocabShard | None:
        """The vocabulary shard this rank's chunks hold; None when they hold all of ``V``."""
        ...

    @property
    def writes(self) -> bool:
        """Whether this rank encodes and writes cache shards (one rank of a teacher group)."""
        ...

    def fingerprint(self) -> str:
        """Architecture plus a digest of the weights; equal fingerprints give equal outputs."""
        ...

    def logits_chunks(
        self, tokens: torch.Tensor, chunk: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """For ``tokens`` int64 ``[B, S]``: ``(start, logp[B, c, V])`` float32 log-probs of the
        next token at positions ``start .. start + c`` (``c <= chunk``), in order, on CPU or
        the teacher's device (``[B, c, V/T]``, columns :attr:`vocab_shard`, on a tensor rank)."""
        ...


def check_tokens(tokens: torch.Tensor, vocab_size: int, chunk: int) -> None:
    """Reject token batches a teacher cannot score, with a message naming the problem."""
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise KDScaleError(
            f"teacher: tokens must be int64 [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if chunk < 1:
        raise KDScaleError(f"cache.teacher.chunk={chunk}: must be >= 1")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise KDScaleError(
            f"teacher: token ids span {int(tokens.min())} .. {int(tokens.max())}, outside the "
            f"teacher's vocabulary 0 .. {vocab_size - 1}"
        )


def weights_fingerprint(kind: str, architecture: str, config: dict, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``<kind>:<architecture>:sha256:<hex>``: a digest of ``config`` and of every tensor's
    name, dtype, shape and bytes, in name order (about a second for 135M float32 parameters)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        if not isinstance(tensor, torch.Tensor):  # e.g. megatron's ``_extra_state`` entries
            continue
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"\0{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return f"{kind}:{architecture}:sha256:{digest.hexdigest()}"
