"""The in-memory form of cached teacher targets, shared by the cache reader and the KD loss.

Shapes use the suffix legend ``B`` = batch, ``S`` = sequence, ``K`` = support slots.
Empty slots (positions whose support is shorter than ``K``) hold id ``-1`` and logp ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TargetKind = Literal["topk", "topp", "sampled"]
TARGET_KINDS: tuple[str, ...] = ("topk", "topp", "sampled")
EMPTY_ID = -1


@dataclass
class SparseTargets:
    """Sparse teacher next-token distributions for a batch of sequences.

    Attributes:
        ids: int64 ``[B, S, K]`` teacher token ids; ``-1`` marks an empty slot.
        logp: float32 ``[B, S, K]`` teacher log-probs at the cache temperature (``-inf`` when
            empty). For ``kind == "sampled"`` it holds ``log(count / N)``, an unbiased estimate.
        tail_logp: float32 ``[B, S]`` log of the teacher mass outside ``ids`` (``-inf`` if none).
        kind: ``"topk"``, ``"topp"`` or ``"sampled"``.
    """

    ids: torch.Tensor
    logp: torch.Tensor
    tail_logp: torch.Tensor
    kind: TargetKind = "topk"

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"SparseTargets.kind={self.kind!r}; allowed: {', '.join(TARGET_KINDS)}")
        if self.ids.dim() != 3 or self.ids.shape != self.logp.shape:
            raise ValueError(
                f"SparseTargets: ids {tuple(self.ids.shape)} and logp {tuple(self.logp.shape)} "
                "must both be [B, S, K]"
            )
        if self.tail_logp.shape != self.ids.shape[:2]:
            raise ValueError(
                f"SparseTargets: tail_logp {tuple(self.tail_logp.shape)} must be [B, S] = "
                f"{tuple(self.ids.shape[:2])}"
            )

    @property
    def shape(self) -> torch.Size:
        """``[B, S, K]``."""
        return self.ids.shape

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[B, S, K]``: which slots hold a teacher id."""
        return self.ids != EMPTY_ID

    def to(self, device: torch.device | str) -> "SparseTargets":
        """The same targets on ``device``."""
        return SparseTargets(
            self.ids.to(device), self.logp.to(device), self.tail_logp.to(device), self.kind
        )

    def narrow(self, dim: int, start: int, length: int) -> "SparseTargets":
        """A slice along batch (``dim=0``) or sequence (``dim=1``), e.g. for micro-batches."""
        if dim not in (0, 1):
            raise ValueError("SparseTargets.narrow: dim must be 0 (batch) or 1 (sequence)")
        return SparseTargets(
            self.ids.narrow(dim, start, length),
            self.logp.narrow(dim, start, length),
            self.tail_logp.narrow(dim, start, length),
            self.kind,
        )

    @staticmethod
    def stack(items: list["SparseTargets"]) -> "SparseTargets":
        """Concatenate along the batch dim, padding ``K`` to the widest item with empty slots."""
        if not items:
            raise ValueError("SparseTargets.stack: nothing to stack")
        kinds = {t.kind for t in items}
        if len(kinds) != 1:
            raise ValueError(f"SparseTargets.stack: mixed kinds {sorted(kinds)}")
        width = max(t.ids.shape[2] for t in items)

        def pad(x: torch.Tensor, value: float) -> torch.Tensor:
            extra = width - x.shape[2]
            return torch.nn.functional.pad(x, (0, extra), value=value) if extra else x

        return SparseTargets(
            torch.cat([pad(t.ids, EMPTY_ID) for t in items]),
            torch.cat([pad(t.logp, float("-inf")) for t in items]),
            torch.cat([t.tail_logp for t in items]),
            items[0].kind,
        )
