"""Teacher backends: token batches → next-token log-probabilities, chunk by chunk."""

from __future__ import annotations

from kdscale.config.cache import TeacherConfig
from kdscale.teacher.base import Teacher, check_tokens


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """The teacher ``cfg`` names (a local HF directory or a fixture name such as smollm2-135m)."""
    from kdscale.teacher.fixture import resolve_model_dir
    from kdscale.teacher.hf import HFTeacher

    return HFTeacher(resolve_model_dir(cfg.model), dtype=cfg.dtype, device=cfg.device)


__all__ = ["Teacher", "TeacherConfig", "build_teacher", "check_tokens"]
