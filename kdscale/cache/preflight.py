"""What ``kdscale cache`` checks before it writes anything or starts Ray: the things that would
otherwise fail only once a teacher actor runs, after a manifest and a lock were written."""

from __future__ import annotations

import torch

from kdscale.config import KDScaleConfig
from kdscale.data.manifest import TokensManifest
from kdscale.errors import KDScaleError


def check_before_start(cfg: KDScaleConfig, tokens: TokensManifest) -> None:
    """Refuse, in one line: a codec that needs more ids than the token set's vocabulary, a
    teacher device this machine lacks (for a local instance), a damaged megatron teacher
    (each actor verifies its checksums again when it loads the weights)."""
    cache = cfg.cache
    try:
        cache.codec.support(tokens.vocab_size)
    except KDScaleError as exc:
        raise KDScaleError(f"{exc} (the token set {cache.tokens})") from None
    if cache.teacher.backend == "megatron":
        from kdscale.models.checkpoints import resolve_checkpoint, verify_checkpoint

        ckpt = resolve_checkpoint(cache.teacher.model, "cache.teacher.model")
        verify_checkpoint(ckpt, cfg.integrity.verify_checksums)
    try:
        device = torch.device(cache.teacher.device)
    except RuntimeError:
        raise KDScaleError(
            f"cache.teacher.device={cache.teacher.device!r}: not a torch device (e.g. cpu, cuda:0)"
        ) from None
    if device.type == "cuda" and not cache.ray.address:
        if not torch.cuda.is_available():
            raise KDScaleError(
                f"cache.teacher.device={cache.teacher.device!r}, but this machine has no CUDA "
                "device; use cpu, or attach to a GPU cluster with cache.ray.address"
            )
        if not cache.ray.gpus_per_actor:
            raise KDScaleError(
                f"cache.teacher.device={cache.teacher.device!r} needs cache.ray.gpus_per_actor "
                "> 0 (Ray hides GPUs from actors that reserve none)"
            )
