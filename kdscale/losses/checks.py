"""Input checks for ``kd_lm_loss`` and ``head_kd_lm_loss``: free Python checks first, then one
combined data check.

Shapes, dtypes and the target kind are checked in Python before any work. Data problems (ids or
labels out of range, duplicate ids, NaN/Inf, a fully masked batch) are counted on the device
while the loss is computed and read back with a single ``tolist()`` — one device→host sync, on
the calls that ask for it (``validate=True``; trainers every ``loss.validate_every`` steps). The
counts come from tensors that are identical on every TP rank (targets, labels, all-reduced
per-token values), so all ranks raise together and none is left waiting in a collective.
"""

from __future__ import annotations

import torch

from kdscale.cache.targets import SparseTargets
from kdscale.config.loss import KDLossConfig
from kdscale.errors import KDScaleError

IGNORE_INDEX = -100


def check_call(
    logits_SBV: torch.Tensor,
    targets: SparseTargets,
    labels_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor | None,
    cfg: KDLossConfig,
) -> None:
    """``kd_lm_loss``: shapes, dtypes and the objective/target-kind pairing; raises KDScaleError."""
    if logits_SBV.dim() != 3 or not logits_SBV.is_floating_point():
        raise KDScaleError(
            f"kd_lm_loss: logits must be a float [S, B, V/TP] tensor, got {logits_SBV.dtype} "
            f"{tuple(logits_SBV.shape)}"
        )
    seq, batch, _ = logits_SBV.shape
    what = f"logits [S, B, V] = {tuple(logits_SBV.shape)}"
    _check_batch("kd_lm_loss", what, seq, batch, targets, labels_BS, loss_mask_BS, cfg)


def check_head_call(
    hidden_SBH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets: SparseTargets | None,
    labels_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor | None,
    cfg: KDLossConfig,
    sequence_shards: int = 1,
) -> None:
    """``head_kd_lm_loss``: as :func:`check_call`, for hidden states and the output weight;
    ``sequence_shards``: the hidden states hold ``S / sequence_shards`` positions (sequence
    parallelism)."""
    if hidden_SBH.dim() != 3 or not hidden_SBH.is_floating_point():
        raise KDScaleError(
            f"head_kd_lm_loss: hidden must be a float [S, B, H] tensor, got {hidden_SBH.dtype} "
            f"{tuple(hidden_SBH.shape)}"
        )
    hidden = hidden_SBH.shape[2]
    if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden or weight_VH.dtype != hidden_SBH.dtype:
        raise KDScaleError(
            f"head_kd_lm_loss: weight must be this rank's output weight [V/TP, H={hidden}] in the "
            f"hidden states' dtype {hidden_SBH.dtype}, got {weight_VH.dtype} "
            f"{tuple(weight_VH.shape)}"
        )
    seq, batch, _ = hidden_SBH.shape
    what = "hidden [S, B, H]" if sequence_shards == 1 else f"hidden [S/{sequence_shards}, B, H]"
    _check_batch(
        "head_kd_lm_loss", f"{what} = {tuple(hidden_SBH.shape)}", seq * sequence_shards, batch,
        targets, labels_BS, loss_mask_BS, cfg,
    )  # fmt: skip


def _check_batch(
    caller: str,
    what: str,
    seq: int,
    batch: int,
    targets: SparseTargets | None,
    labels_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor | None,
    cfg: KDLossConfig,
) -> None:
    """Targets (None: LM only), labels and mask against the student's ``S``, ``B`` (``what``)."""
    if targets is not None and targets.ids.shape[:2] != (batch, seq):
        raise KDScaleError(
            f"{caller}: targets are [B, S, K] = {tuple(targets.ids.shape)} but {what} "
            f"need B={batch}, S={seq}"
        )
    if labels_BS.dtype != torch.int64 or (targets is not None and targets.ids.dtype != torch.int64):
        ids_dtype = "none" if targets is None else targets.ids.dtype
        raise KDScaleError(
            f"{caller}: targets.ids ({ids_dtype}) and labels ({labels_BS.dtype}) must be int64"
        )
    if labels_BS.shape != (batch, seq):
        raise KDScaleError(
            f"{caller}: labels {tuple(labels_BS.shape)} must be [B, S] = {(batch, seq)}"
        )
    if loss_mask_BS is not None and loss_mask_BS.shape != (batch, seq):
        raise KDScaleError(
            f"{caller}: loss_mask {tuple(loss_mask_BS.shape)} must be [B, S] = {(batch, seq)}"
        )
    if targets is not None:
        check_target_kind(targets.kind, cfg)


def check_target_kind(kind: str, cfg: KDLossConfig) -> None:
    """Refuse an objective that is wrong for targets of this kind (topk, topp, sampled)."""
    if kind == "sampled" and (cfg.divergence != "fkl" or cfg.missing_mass == "renorm"):
        raise KDScaleError(
            f"loss.divergence={cfg.divergence!r}, loss.missing_mass={cfg.missing_mass!r} on "
            "'sampled' targets: only forward KL with missing_mass 'tail' or 'zero' (cross-entropy "
            "to the sampled frequencies) is an unbiased estimate of full-vocabulary KD; use "
            "divergence='fkl' or a topk/topp cache"
        )


def count_problems(
    targets_ids_NK: torch.Tensor,
    t_logp_NK: torch.Tensor,
    t_tail_N: torch.Tensor,
    labels_N: torch.Tensor,
    weight_N: torch.Tensor,
    kd_N: torch.Tensor,
    nll_N: torch.Tensor,
    vocab_size: int,
    uses_tail: bool,
) -> torch.Tensor:
    """Device-side counts in the order of :data:`PROBLEMS`, then the number of counted rows.

    Teacher ids, values and the loss terms are checked at counted (weight > 0) rows only;
    labels and the mask everywhere.
    """
    token = weight_N > 0
    slot = (targets_ids_NK != -1) & token[:, None]
    ids_bad = slot & ((targets_ids_NK < 0) | (targets_ids_NK >= vocab_size))
    sorted_ids = targets_ids_NK.sort(1).values
    dup = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0) & token[:, None]
    label_bad = (labels_N != IGNORE_INDEX) & ((labels_N < 0) | (labels_N >= vocab_size))
    teacher_bad = (slot & (t_logp_NK.isnan() | (t_logp_NK == float("inf")))).sum()
    if uses_tail:
        teacher_bad = teacher_bad + (token & (t_tail_N.isnan() | (t_tail_N == float("inf")))).sum()
    counts = [
        ids_bad.sum(),
        dup.sum(),
        label_bad.sum(),
        (~weight_N.isfinite() | (weight_N < 0)).sum(),
        teacher_bad,
        (token & ~nll_N.isfinite()).sum(),
        (token & ~kd_N.isfinite()).sum(),
        token.sum(),
    ]
    return torch.stack([c.to(torch.float64) for c in counts])


PROBLEMS = (
    "teacher ids outside [0, {vocab}) (the student's vocabulary; -1 marks an empty slot)",
    "duplicate teacher ids within a position (the support must list distinct ids)",
    "labels outside [0, {vocab}) (use -100 to ignore a position)",
    "loss_mask entries that are negative, NaN or Inf",
    "NaN/+Inf teacher log-probs (targets.logp or targets.tail_logp)",
    "positions with a non-finite LM term (NaN/+Inf in the student logits, or a -inf logit at "
    "the label)",
    "positions with a non-finite KD term (NaN/+Inf in the student logits, or the student has no "
    "mass where the teacher has some)",
)


def raise_problems(counts: torch.Tensor, vocab_size: int, caller: str = "kd_lm_loss") -> None:
    """Read the counts back (the one host sync) and raise KDScaleError for the first problem."""
    values = counts.tolist()  # host sync
    *problems, tokens = values
    for count, text in zip(problems, PROBLEMS):
        if count:
            raise KDScaleError(f"{caller}: {int(count)} {text.format(vocab=vocab_size)}")
    if tokens == 0:
        raise KDScaleError(
            f"{caller}: every position is masked (labels all -100 or loss_mask all 0); "
            "nothing to train on in this batch"
        )
