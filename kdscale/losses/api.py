"""``kd_lm_loss``: LM cross-entropy and sparse KD in one pass over vocab-parallel student logits;
``head_kd_lm_loss``: the same with the output layer fused in, so the logits never exist whole.

    from kdscale.losses import KDLossConfig, head_kd_lm_loss, kd_lm_loss, kd_weight_at
    alpha = kd_weight_at(cfg.loss, step, total_steps)
    out = kd_lm_loss(logits_SBV, targets, labels_BS, cfg.loss, tp_group, loss_mask=mask_BS,
                     kd_weight=alpha)
    out = head_kd_lm_loss(hidden_SBH, weight_VH, targets, labels_BS, cfg.loss, tp_group,
                          loss_mask=mask_BS, kd_weight=alpha)     # weight_VH: [V/TP, H] shard
    (out.loss.sum() / out.metrics["tokens"]).backward()

Per token: ``loss = w · (α · T² · D(teacher ‖ student at T) + (1 − α) · CE(label at T = 1))`` with
``w = loss_mask · [label != -100]``. The fused passes are :mod:`kdscale.losses.vocab_parallel`
(from logits) and :mod:`kdscale.losses.head` (from hidden states and the output weight); both feed
one objective (:func:`_objective`: buckets from :mod:`kdscale.losses.divergences`, α-mixing,
metrics, the checks of :mod:`kdscale.losses.checks`), so values and metrics agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdscale.cache.targets import SparseTargets
from kdscale.config.loss import KDLossConfig
from kdscale.errors import KDScaleError
from kdscale.losses.checks import (
    IGNORE_INDEX,
    check_call,
    check_head_call,
    count_problems,
    raise_problems,
)
from kdscale.losses.divergences import divergence, support_buckets, teacher_tail_kl
from kdscale.losses.head import head_sparse_log_softmax
from kdscale.losses.schedule import resolve_kd_weight
from kdscale.losses.vocab_parallel import (
    SparseLogSoftmax,
    compute_dtype,
    group_rank_size,
    sparse_log_softmax,
)


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
    Without teacher targets (``head_kd_lm_loss``'s LM-only mode): ``loss``, ``lm``,
    ``kd_weight`` and ``tokens`` only.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _rows(x_BS: torch.Tensor) -> torch.Tensor:
    """``[B, S, ...]`` → ``[S·B, ...]`` in the logits' ``(s, b)`` row order."""
    x_SB = x_BS.transpose(0, 1)
    return x_SB.reshape(x_SB.shape[0] * x_SB.shape[1], *x_SB.shape[2:])


@dataclass
class _TokenRows:
    """One call's targets, labels and weights as ``N = S·B`` rows (``K = 0`` without targets)."""

    seq: int
    batch: int
    ids_NK: torch.Tensor
    labels_N: torch.Tensor
    weight_N: torch.Tensor
    token_N: torch.Tensor
    valid_NK: torch.Tensor
    t_logp_NK: torch.Tensor
    t_tail_N: torch.Tensor
    lm_only: bool


def _token_rows(
    seq: int,
    batch: int,
    targets: SparseTargets | None,
    labels_BS: torch.Tensor,
    loss_mask: torch.Tensor | None,
    cdt: torch.dtype,
) -> _TokenRows:
    labels_N = _rows(labels_BS)
    weight_N = (labels_N != IGNORE_INDEX).to(cdt)
    if loss_mask is not None:
        weight_N = weight_N * _rows(loss_mask).to(cdt)
    if targets is None:
        ids_NK = labels_N.new_empty(labels_N.shape[0], 0)
        t_logp_NK = weight_N.new_empty(labels_N.shape[0], 0)
        t_tail_N = torch.full_like(weight_N, float("-inf"))
    else:
        ids_NK = _rows(targets.ids)
        t_logp_NK, t_tail_N = _rows(targets.logp).to(cdt), _rows(targets.tail_logp).to(cdt)
    return _TokenRows(
        seq, batch, ids_NK, labels_N, weight_N, weight_N > 0, ids_NK >= 0, t_logp_NK, t_tail_N,
        lm_only=targets is None,
    )  # fmt: skip


def _objective(
    student: SparseLogSoftmax,
    rows: _TokenRows,
    cfg: KDLossConfig,
    alpha: float,
    vocab: int,
    validate: bool,
    caller: str,
) -> KDLossOutput:
    """Buckets, divergence, α-mixing, metrics and checks: the part both entry points share."""
    cdt = student.nll_N.dtype
    token_N, weight_N, valid_NK = rows.token_N, rows.weight_N, rows.valid_NK
    # Terms with zero weight stay out of the graph, so backward skips their vocab work.
    nll_N = student.nll_N if alpha < 1.0 else student.nll_N.detach()
    kd_N = buckets = None
    if rows.lm_only:
        total_N = nll_N
    else:
        logq_NK, logq_tail_N = student.logq_NK, student.logq_tail_N
        if alpha == 0.0:
            logq_NK, logq_tail_N = logq_NK.detach(), logq_tail_N.detach()
        buckets = support_buckets(
            cfg.missing_mass, rows.t_logp_NK, rows.t_tail_N, logq_NK, logq_tail_N, valid_NK, token_N
        )
        kd_N = cfg.temperature**2 * divergence(cfg.divergence, buckets, cfg.jsd_beta)
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

        metrics = {
            "loss": mean(total_N),
            "lm": mean(nll_N),
            "kd_weight": torch.tensor(alpha, dtype=cdt, device=loss_N.device),
            "tokens": token_N.sum().to(cdt),
        }
        if kd_N is not None and buckets is not None:
            if cfg.divergence == "fkl" and cfg.missing_mass == "tail":
                kl_N = kd_N / cfg.temperature**2  # the run's own term is the fixed definition
            else:
                kl_N = teacher_tail_kl(
                    buckets, cfg.missing_mass, rows.t_logp_NK, rows.t_tail_N, logq_NK,
                    logq_tail_N, valid_NK, token_N,
                )  # fmt: skip
            metrics |= {
                "kd": mean(kd_N),
                "kl_teacher_tail": mean(kl_N),
                "covered_mass": mean(torch.where(valid_NK, rows.t_logp_NK.exp(), 0.0).sum(1)),
                "student_covered_mass": mean(logq_NK.exp().sum(1)),
            }
        if validate:
            counts = count_problems(
                rows.ids_NK, rows.t_logp_NK, rows.t_tail_N, rows.labels_N, weight_N,
                torch.zeros_like(nll_N) if kd_N is None else kd_N, nll_N, vocab,
                uses_tail=cfg.missing_mass == "tail" and not rows.lm_only,
            )  # fmt: skip
            raise_problems(counts, vocab, caller)
    return KDLossOutput(loss_N.view(rows.seq, rows.batch).t().contiguous(), metrics)


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
    rows = _token_rows(seq, batch, targets, labels_BS, loss_mask, compute_dtype(logits_SBV.dtype))
    student = sparse_log_softmax(
        logits_SBV,
        rows.ids_NK,
        rows.labels_N,
        temperature=cfg.temperature,
        tp_group=tp_group,
        overwrite_logits=cfg.overwrite_logits,
        chunk_elements=cfg.chunk_elements,
    )
    vocab = width * group_rank_size(tp_group)[1]
    return _objective(student, rows, cfg, alpha, vocab, validate, "kd_lm_loss")


def head_kd_lm_loss(
    hidden_SBH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets: SparseTargets | None,
    labels_BS: torch.Tensor,
    cfg: KDLossConfig,
    tp_group: dist.ProcessGroup | None = None,
    *,
    loss_mask: torch.Tensor | None = None,
    kd_weight: float | None = None,
    validate: bool = True,
    sequence_parallel: bool = False,
) -> KDLossOutput:
    """:func:`kd_lm_loss` of the output layer's logits ``hidden_SBH @ weight_VHᵀ``, computed
    without materialising them (:mod:`kdscale.losses.head`): same values, metrics and options.

    Args:
        hidden_SBH: ``[S, B, H]`` final hidden states (megatron layout), float32 or bf16; with
            ``sequence_parallel``, this rank's ``[S/TP, B, H]`` slice of them.
        weight_VH: this rank's vocab shard ``[V/TP, H]`` of the output weight in the same dtype:
            the output layer's, or the word embedding's when they are tied.
        targets: teacher targets ``[B, S, K]``; None trains on the labels alone (α = 0, LM only).
        labels_BS, cfg, tp_group, loss_mask, validate: as for :func:`kd_lm_loss`.
        kd_weight: α as for :func:`kd_lm_loss`; must be None or 0 without targets.
        sequence_parallel: the hidden states are sharded along the sequence over ``tp_group``
            (megatron's sequence parallelism); they are gathered as ColumnParallelLinear does.

    Gradients reach ``hidden_SBH`` (reduced over ``tp_group`` as megatron's ColumnParallelLinear
    does, with or without sequence parallelism) and ``weight_VH`` (this rank's shard, in its
    dtype, through autograd's ``.grad``).
    """
    if targets is None:
        if kd_weight not in (None, 0.0):
            raise KDScaleError(
                f"head_kd_lm_loss: kd_weight={kd_weight} without teacher targets; pass targets "
                "or kd_weight=0 (LM only)"
            )
        alpha = 0.0
    else:
        alpha = resolve_kd_weight(cfg, kd_weight)
    shards = group_rank_size(tp_group)[1] if sequence_parallel else 1
    check_head_call(hidden_SBH, weight_VH, targets, labels_BS, loss_mask, cfg, shards)
    seq, batch = hidden_SBH.shape[0] * shards, hidden_SBH.shape[1]
    rows = _token_rows(seq, batch, targets, labels_BS, loss_mask, compute_dtype(hidden_SBH.dtype))
    student = head_sparse_log_softmax(
        hidden_SBH,
        weight_VH,
        rows.ids_NK,
        rows.labels_N,
        temperature=1.0 if targets is None else cfg.temperature,
        tp_group=tp_group,
        chunk_elements=cfg.chunk_elements,
        sequence_parallel=sequence_parallel,
    )
    vocab = weight_VH.shape[0] * group_rank_size(tp_group)[1]
    return _objective(student, rows, cfg, alpha, vocab, validate, "head_kd_lm_loss")
