"""Sparse KD losses on vocab-parallel student logits, fused with the LM cross-entropy.

    from kdscale.losses import KDLossConfig, head_kd_lm_loss, kd_lm_loss
    out = kd_lm_loss(logits_SBV, targets, labels_BS, KDLossConfig(), tp_group=None)
    out = head_kd_lm_loss(hidden_SBH, weight_VH, targets, labels_BS, KDLossConfig())  # fused head

See :mod:`kdscale.losses.api` for the objective and DESIGN.md "Loss" for the contract.
"""

from kdscale.config.loss import KDLossConfig, KDWeightSchedule
from kdscale.losses.api import KDLossOutput, head_kd_lm_loss, kd_lm_loss
from kdscale.losses.head import head_sparse_log_softmax
from kdscale.losses.schedule import check_cache_temperature, kd_weight_at, resolve_kd_weight
from kdscale.losses.vocab_parallel import SparseLogSoftmax, sparse_log_softmax

__all__ = [
    "KDLossConfig",
    "KDLossOutput",
    "KDWeightSchedule",
    "SparseLogSoftmax",
    "check_cache_temperature",
    "head_kd_lm_loss",
    "head_sparse_log_softmax",
    "kd_lm_loss",
    "kd_weight_at",
    "resolve_kd_weight",
    "sparse_log_softmax",
]
