"""Teacher backends: token batches → next-token log-probabilities, chunk by chunk."""

from __future__ import annotations

from pathlib import Path

from kdscale.config.cache import TeacherConfig
from kdscale.teacher.base import Teacher, VocabShard, check_tokens


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """The teacher ``cfg`` names: an HF directory or fixture (``hf``) or a kdscale checkpoint
    (``megatron``, built at the checkpoint's own precision; with ``tensor_parallel`` or
    ``pipeline_parallel`` > 1 this process is one rank of the group its environment names)."""
    if cfg.backend == "megatron":
        from kdscale.teacher.megatron import MegatronTeacher

        return MegatronTeacher(
            cfg.model, device=cfg.device, tensor=cfg.tensor_parallel, pipeline=cfg.pipeline_parallel,
            dtype=cfg.dtype,
        )  # fmt: skip
    from kdscale.hub import resolve_model_dir
    from kdscale.teacher.hf import HFTeacher

    return HFTeacher(resolve_model_dir(cfg.model), dtype=cfg.dtype, device=cfg.device)


def teacher_tokenizer(cfg: TeacherConfig) -> str:
    """Where the teacher's tokenizer lives (to check it made the tokens being scored)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.backend == "megatron" and (Path(cfg.model) / "hf").is_dir():
        return str(Path(cfg.model) / "hf")
    return cfg.model


__all__ = ["Teacher", "TeacherConfig", "VocabShard", "build_teacher", "check_tokens", "teacher_tokenizer"]
