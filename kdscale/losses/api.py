"""``kd_lm_loss``: LM cross-entropy and sparse KD in one pass over vocab-parallel student logits.

    from kdscale.losses import KDLossConfig, kd_lm_loss, kd_weight_at
    alpha = kd_weight_at(cfg.loss, step, total_steps)
    out = kd_lm_loss(logits_SBV, targets, labels_BS, cfg.loss, tp_group, loss_mask=mask_BS,
                     kd_weight=alpha)
    (out.loss.sum() / out.metrics["tokens"]).backward()

Per token: ``loss = w · (α · T² · D(teacher ‖ student at T) + (1 − α) · CE(label at T = 1))`` with
``w = loss_mask · [label != -100]``. The fused pass is :mod:`kdscale.losses.vocab_parallel`, the
bucket math :mod:`kdscale.losses.divergences`, the checks :mod:`kdscale.losses.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdscale.cache.targets import SparseTargets
from kdscale.config.loss import KDLossConfig
from kdscale.losses.checks import IGNORE_INDEX, check_call, count_problems, raise_problems
from kdscale.losses.divergences import divergence, support_buckets, teacher_tail_kl
from kdscale.losses.schedule import resolve_kd_weight
from kdscale.losses.vocab_parallel import compute_dtype, group_rank_size, sparse_log_softmax


@dataclass
class KDLossOutput:
    """``loss``: per-token total ``[B, S]`` (float32; float64 for float64 logits), 0 where masked.

    ``metrics``: scalar tensors, weighted token means over counted positions — ``loss``, ``kd``
    (the run's own KD term: its divergence and missing-mass buckets, α-free, T²-scaled), ``lm``,
    ``kl_teacher_tail`` (one fixed definition for every run: forward KL from the teacher's cached
    distribution, top ids plus the tail bucket, to the student at T;
    :func:`~kdscale.losses.divergences.teacher_tail_kl`), ``covered_mass`` (teacher mass on the
    support), ``student_covered_mass`` (student mass there, at T) — plus ``kd_weight`` (α) and
    ``tokens`` (counted positions).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _rows(x_BS: torch.Tensor) -> torch.Tensor:
    """``[B, S, ...]`` → ``[S·B, ...]`` in the logits' ``(s, b)`` row order."""
    x_SB = x_BS.transpose(0, 1)
    return x_SB.reshape(x_SB.shape[0] * x_SB.shape[1], *x_SB.shape[2:])


def kd_lm_loss(
    logits_SBV: torch.Tensor,
    targets: SparseTargets,
    labels_BS: torch.Tensor,
    cfg: KDLossConfig,
    tp_group: dist.ProcessGroup | None = None,
    *,
    loss_mask: torch.Tensor | None = None,
    kd_weight: float | None = None,
    validate: bool = True,
) -> KDLossOutput:
    """Per-token ``α·KD + (1-α)·LM`` from this rank's vocab shard of the student logits.

    Args:
        logits_SBV: ``[S, B, V/TP]`` student logits (any float dtype; math runs in float32).
        targets: teacher targets ``[B, S, K]`` for the global vocab ``V = V/TP · TP``.
        labels_BS: int64 next-token labels; -100 ignores a position.
        cfg: the ``loss`` config section.
        tp_group: the tensor-parallel group the vocab is split over (None: not split).
        loss_mask: optional float ``[B, S]`` weights (0 drops a position).
        kd_weight: α for this step, ``kd_weight_at(cfg, step, total_steps)``; required unless
            the schedule is constant (then ``cfg.kd_weight``).
        validate: check the inputs' values (ids and labels in range, distinct ids, finite
            terms, some unmasked token): one device→host sync. Trainers pass it every
            ``cfg.validate_every`` steps.
    """
    alpha = resolve_kd_weight(cfg, kd_weight)
    check_call(logits_SBV, targets, labels_BS, loss_mask, cfg)
    seq, batch, width = logits_SBV.shape
    vocab = width * group_rank_size(tp_group)[1]
    cdt = compute_dtype(logits_SBV.dtype)
    temp_sq = cfg.temperature**2

    ids_NK, labels_N = _rows(targets.ids), _rows(labels_BS)
    weight_N = (labels_N != IGNORE_INDEX).to(cdt)
    if loss_mask is not None:
        weight_N = weight_N * _rows(loss_mask).to(cdt)
    token_N, valid_NK = weight_N > 0, ids_NK >= 0
    t_logp_NK, t_tail_N = _rows(targets.logp).to(cdt), _rows(targets.tail_logp).to(cdt)

    student = sparse_log_softmax(
        logits_SBV,
        ids_NK,
        labels_N,
        temperature=cfg.temperature,
        tp_group=tp_group,
        overwrite_logits=cfg.overwrite_logits,
        chunk_elements=cfg.chunk_elements,
    )
    # Terms with zero weight stay out of the graph, so backward skips their vocab work.
    logq_NK, logq_tail_N = student.logq_NK, student.logq_tail_N
    if alpha == 0.0:
        logq_NK, logq_tail_N = logq_NK.detach(), logq_tail_N.detach()
    nll_N = student.nll_N if alpha < 1.0 else student.nll_N.detach()
    buckets = support_buckets(
        cfg.missing_mass, t_logp_NK, t_tail_N, logq_NK, logq_tail_N, valid_NK, token_N
    )
    kd_N = temp_sq * divergence(cfg.divergence, buckets, cfg.jsd_beta)
    if alpha == 1.0:
        total_N = kd_N
    elif alpha == 0.0:
        total_N = nll_N
    else:
        total_N = alpha * kd_N + (1.0 - alpha) * nll_N
    loss_N = torch.where(token_N, weight_N * total_N, 0.0)

    with torch.no_grad():
        weight_sum = weight_N.sum().clamp_min(torch.finfo(cdt).tiny)

        def mean(x_N: torch.Tensor) -> torch.Tensor:
            return torch.where(token_N, weight_N * x_N, 0.0).sum() / weight_sum

        if cfg.divergence == "fkl" and cfg.missing_mass == "tail":
            kl_N = kd_N / temp_sq  # the run's own term is the fixed definition
        else:
            kl_N = teacher_tail_kl(
                buckets, cfg.missing_mass, t_logp_NK, t_tail_N, logq_NK, logq_tail_N, valid_NK,
                token_N,
            )  # fmt: skip
        metrics = {
            "loss": mean(total_N),
            "kd": mean(kd_N),
            "lm": mean(nll_N),
            "kl_teacher_tail": mean(kl_N),
            "covered_mass": mean(torch.where(valid_NK, t_logp_NK.exp(), 0.0).sum(1)),
            "student_covered_mass": mean(logq_NK.exp().sum(1)),
            "kd_weight": torch.tensor(alpha, dtype=cdt, device=loss_N.device),
            "tokens": token_N.sum().to(cdt),
        }
        if validate:
            counts = count_problems(
                ids_NK, t_logp_NK, t_tail_N, labels_N, weight_N, kd_N, nll_N, vocab,
                uses_tail=cfg.missing_mass == "tail",
            )  # fmt: skip
            raise_problems(counts, vocab)
    return KDLossOutput(loss_N.view(seq, batch).t().contiguous(), metrics)
