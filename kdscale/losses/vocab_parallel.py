"""One fused pass over vocab-parallel student logits: log-probs at teacher ids, tail mass, LM NLL.

The student's logits arrive in megatron layout ``logits_SBV`` = ``[S, B, V/TP]``: this rank holds
the vocab slice ``[rank·V, (rank+1)·V)`` (``V`` = local shard width). For ``N = S·B`` token rows
(in the logits' ``(s, b)`` order) and ``K`` teacher support slots, :func:`sparse_log_softmax`
returns, with ``s = z / T`` and ``q = softmax(s)`` over the FULL vocabulary:

- ``logq_NK``: ``log q`` at the teacher ids (``-inf`` in empty slots, id ``-1``);
- ``logq_tail_N``: ``log`` of the student mass outside the support, summed directly over the
  non-support ids (no ``1 - Σq`` cancellation when the support holds nearly all the mass);
- ``nll_N``: ``-log softmax(z)[label]`` at ``T = 1`` (0 where the label is negative, e.g. -100).

Communication over ``tp_group`` (none when it is None or has one rank): one MAX all-reduce of the
per-token max, then one SUM all-reduce of a packed ``[N, K + 2 (+1 if T != 1)]`` tensor: the
logits at the teacher ids and at the label (zero off-shard, so the sum gathers them), this rank's
sum of ``exp(s - max)`` outside the support, and at ``T != 1`` the ``T = 1`` sum for the LM term.
The vocabulary is never gathered; backward needs no communication.

Memory and passes. Math runs in float32 (float64 for float64 logits), chunk by chunk over token
rows, so temporaries are one reused ``[chunk, V]`` float buffer (two at ``T != 1``). The graph
saves the logits and per-token scalars only. How the logits' storage is used (:class:`Storage`):

- ``STORE_EXP`` (float32/64 logits, ``T = 1``, storage reuse allowed): like megatron's
  ``vocab_parallel_cross_entropy``, forward overwrites the logits with ``exp(z - max)`` and
  backward turns that into the gradient in place: one exp pass in all, no copies.
- ``GRAD_INPLACE`` (bf16/fp16 logits or ``T != 1``): forward leaves the logits intact, backward
  recomputes the softmax from them and the saved max/sums, writing the gradient over them.
- ``SEPARATE`` (reuse not allowed: a leaf or a view, or ``overwrite_logits=False``): as above
  but the gradient is a new tensor and the logits are never written.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable


class SparseLogSoftmax(NamedTuple):
    """What :func:`sparse_log_softmax` returns (all in the compute dtype)."""

    logq_NK: torch.Tensor
    logq_tail_N: torch.Tensor
    nll_N: torch.Tensor


class Storage(enum.Enum):
    """How the fused pass may use the logits' storage (see the module docstring)."""

    STORE_EXP = "store_exp"
    GRAD_INPLACE = "grad_inplace"
    SEPARATE = "separate"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype (bf16, fp16, fp32) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) of ``group``; ``(0, 1)`` for None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _shard_index(ids: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local column of each id in ``[start, start + width)`` (0 elsewhere) and the in-shard mask."""
    inside = (ids >= start) & (ids < start + width)
    return torch.where(inside, ids - start, 0), inside


class _Chunks:
    """Row chunks of a ``[N, V]`` matrix and reusable float buffers of chunk shape."""

    def __init__(
        self, rows: int, width: int, chunk_elements: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        step = max(1, min(rows, chunk_elements // max(width, 1)))
        self.slices = [slice(r, min(rows, r + step)) for r in range(0, rows, step)]
        self._shape, self._dtype, self._device = (step, width), dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, rows: slice) -> torch.Tensor:
        """The ``name`` buffer cut to ``rows``' length (allocated on first use)."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self._shape, dtype=self._dtype, device=self._device)
        return self._buffers[name][: rows.stop - rows.start]


def _zero_support_and_sum(
    e: torch.Tensor, idx: torch.Tensor, inside: torch.Tensor, restore: bool
) -> torch.Tensor:
    """Row sums of ``e`` outside the support (zeroed exactly: e - e == 0), optionally restored."""
    e_sup = e.gather(1, idx).masked_fill_(~inside, 0.0)
    e.scatter_add_(1, idx, e_sup.neg())
    total = e.sum(1)
    if restore:  # off-shard slots point at column 0 with a 0 added: harmless
        e.scatter_add_(1, idx, e_sup)
    return total


class _SparseLogSoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        logits_SBV: torch.Tensor,
        ids_NK: torch.Tensor,
        labels_N: torch.Tensor,
        temperature: float,
        tp_group: dist.ProcessGroup | None,
        storage: Storage,
        chunk_elements: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        (n_rows, k), width = ids_NK.shape, logits_SBV.shape[-1]
        cdt = compute_dtype(logits_SBV.dtype)
        inv_t, separate_lm = 1.0 / temperature, temperature != 1.0
        store = storage is Storage.STORE_EXP
        assert not (store and (separate_lm or logits_SBV.dtype != cdt))
        rank = group_rank_size(tp_group)[0]
        z_NV = logits_SBV.reshape(n_rows, width)
        sup_idx, sup_in = _shard_index(ids_NK, rank * width, width)
        lab_idx, lab_in = _shard_index(labels_N.unsqueeze(1), rank * width, width)

        max_N = z_NV.amax(dim=1).to(cdt)
        _all_reduce(max_N, dist.ReduceOp.MAX, tp_group)

        # Packed columns: [0, K) logits at the ids, K the label logit, K+1 the sum of exp outside
        # the support at T, K+2 (T != 1 only) the full sum of exp at T = 1. Gathered before the
        # chunk loop, which may overwrite the logits.
        packed = torch.empty(n_rows, k + 2 + int(separate_lm), dtype=cdt, device=z_NV.device)
        packed[:, :k] = z_NV.gather(1, sup_idx).to(cdt).masked_fill_(~sup_in, 0.0)
        packed[:, k] = z_NV.gather(1, lab_idx).to(cdt).masked_fill_(~lab_in, 0.0).squeeze(1)
        chunks = _Chunks(n_rows, width, chunk_elements, cdt, z_NV.device)
        for rows in chunks.slices:
            t = z_NV[rows] if store else chunks.buffer("t", rows).copy_(z_NV[rows])
            t.sub_(max_N[rows, None])
            if separate_lm:
                packed[rows, k + 2] = torch.exp(t, out=chunks.buffer("u", rows)).sum(1)
                t.mul_(inv_t)
            t.exp_()
            packed[rows, k + 1] = _zero_support_and_sum(t, sup_idx[rows], sup_in[rows], store)
        _all_reduce(packed, dist.ReduceOp.SUM, tp_group)

        valid = ids_NK >= 0
        shift_NK = ((packed[:, :k] - max_N[:, None]) * inv_t).masked_fill_(~valid, float("-inf"))
        e_sup_NK = shift_NK.exp()
        s_tail_N = packed[:, k + 1]
        s_total_N = s_tail_N + e_sup_NK.sum(1)
        log_total_N = s_total_N.log()
        s_lm_N = packed[:, k + 2] if separate_lm else s_total_N
        nll_N = (max_N + s_lm_N.log() - packed[:, k]).masked_fill_(labels_N < 0, 0.0)

        ctx.save_for_backward(
            logits_SBV, max_N, s_total_N, s_tail_N, s_lm_N, e_sup_NK, valid,
            sup_idx, sup_in, lab_idx, lab_in,
        )  # fmt: skip
        ctx.temperature, ctx.storage, ctx.chunk_elements = temperature, storage, chunk_elements
        return shift_NK - log_total_N[:, None], s_tail_N.log() - log_total_N, nll_N

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx,
        g_NK: torch.Tensor | None,
        g_tail_N: torch.Tensor | None,
        g_nll_N: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        (logits_SBV, max_N, s_total_N, s_tail_N, s_lm_N, e_sup_NK, valid,
         sup_idx, sup_in, lab_idx, lab_in) = ctx.saved_tensors  # fmt: skip
        kd, lm = g_NK is not None or g_tail_N is not None, g_nll_N is not None
        if not (kd or lm):
            return (None,) * 7
        inv_t, separate_lm = 1.0 / ctx.temperature, ctx.temperature != 1.0
        n_rows, width = max_N.shape[0], logits_SBV.shape[-1]
        cdt = max_N.dtype

        # d(loss)/d(z_v) = e_v·coef + sparse corrections, with e_v = exp(s_v - max) and
        #   log q_i    = s_i - log S_total         → g_i·(δ_iv - e_v / S_total)
        #   log q_tail = log S_tail - log S_total  → g_tail·([v ∉ support]·e_v / S_tail - e_v / S_total)
        # The LM term adds g_nll·(e1_v / S_lm - δ_v,label) with e1_v = exp(z_v - max).
        coef_kd_N = coef_lm_N = corr_sup_NK = corr_lab_N1 = None
        if kd:
            g_NK = torch.zeros_like(e_sup_NK) if g_NK is None else g_NK.masked_fill(~valid, 0.0)
            g_tail_N = torch.zeros_like(s_tail_N) if g_tail_N is None else g_tail_N
            # S_tail == 0 means every non-support e_v is 0, so this coefficient multiplies nothing.
            tail_ratio_N = torch.where(s_tail_N > 0, g_tail_N / s_tail_N, 0.0)
            coef_kd_N = (tail_ratio_N - (g_NK.sum(1) + g_tail_N) / s_total_N) * inv_t
            corr_sup_NK = (g_NK - e_sup_NK * tail_ratio_N[:, None]) * inv_t
            corr_sup_NK.masked_fill_(~sup_in, 0.0)
        if lm:
            coef_lm_N = g_nll_N / s_lm_N
            corr_lab_N1 = (-g_nll_N).unsqueeze(1).masked_fill(~lab_in, 0.0)
        if kd and lm and not separate_lm:  # at T = 1 one exp serves both terms
            coef_kd_N, coef_lm_N = coef_kd_N + coef_lm_N, None
        two_exps = coef_kd_N is not None and coef_lm_N is not None
        coef_N = coef_kd_N if coef_kd_N is not None else coef_lm_N  # the single-exp coefficient

        z_NV = logits_SBV.reshape(n_rows, width)
        storage = ctx.storage
        grad_NV = torch.empty_like(z_NV) if storage is Storage.SEPARATE else z_NV
        direct = z_NV.dtype == cdt  # work in the output chunk itself, no float copy
        chunks = _Chunks(n_rows, width, ctx.chunk_elements, cdt, z_NV.device)
        for rows in chunks.slices:
            if storage is Storage.STORE_EXP:  # already exp(z - max): T = 1, one coefficient
                t = grad_NV[rows].mul_(coef_N[rows, None])
            else:
                if direct:
                    t = torch.sub(z_NV[rows], max_N[rows, None], out=grad_NV[rows])
                else:
                    t = chunks.buffer("t", rows).copy_(z_NV[rows]).sub_(max_N[rows, None])
                if two_exps:  # T != 1: the KD exp in a scratch chunk, the LM exp in place
                    u = torch.mul(t, inv_t, out=chunks.buffer("u", rows)).exp_()
                    t.exp_().mul_(coef_lm_N[rows, None]).add_(u.mul_(coef_kd_N[rows, None]))
                else:  # one exp: at T for the KD term, at T = 1 for the LM term alone
                    if coef_kd_N is not None and separate_lm:
                        t.mul_(inv_t)
                    t.exp_().mul_(coef_N[rows, None])
            if corr_sup_NK is not None:
                t.scatter_add_(1, sup_idx[rows], corr_sup_NK[rows])
            if corr_lab_N1 is not None:
                t.scatter_add_(1, lab_idx[rows], corr_lab_N1[rows])
            if not direct:
                grad_NV[rows].copy_(t)
        return grad_NV.view(logits_SBV.shape), None, None, None, None, None, None


def choose_storage(logits_SBV: torch.Tensor, temperature: float, overwrite_logits: bool) -> Storage:
    """The :class:`Storage` mode for these logits; reuse needs a contiguous, non-leaf, non-view
    tensor (a leaf's or a view's storage belongs to another tensor too)."""
    reusable = (
        overwrite_logits
        and logits_SBV.requires_grad
        and not logits_SBV.is_leaf
        and logits_SBV._base is None
        and logits_SBV.is_contiguous()
    )
    if not reusable:
        return Storage.SEPARATE
    if temperature == 1.0 and logits_SBV.dtype in (torch.float32, torch.float64):
        return Storage.STORE_EXP
    return Storage.GRAD_INPLACE


def sparse_log_softmax(
    logits_SBV: torch.Tensor,
    ids_NK: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    overwrite_logits: bool = True,
    chunk_elements: int = 1 << 21,
) -> SparseLogSoftmax:
    """Student log-probs at ``ids_NK``, the tail, and the label NLL; see the module docstring.

    ``ids_NK`` and ``labels_N`` hold global vocab ids for the ``N = S·B`` rows in ``(s, b)`` order
    (``-1`` = empty slot, negative label = ignored). With ``overwrite_logits`` the logits' storage
    may be reused (:func:`choose_storage`): do not read the logits after this call. Autograd's
    version counter still refuses any other graph node that saved them.
    """
    storage = choose_storage(logits_SBV, temperature, overwrite_logits)
    return SparseLogSoftmax(
        *_SparseLogSoftmaxFn.apply(
            logits_SBV, ids_NK, labels_N, temperature, tp_group, storage, chunk_elements
        )
    )
