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

Cost at ``T != 1``. The KD term needs ``exp((z - max) / T)`` and the LM term ``exp(z - max)``
over the whole vocabulary, so forward and backward each take two exponentials per logit. Every
exponential is taken as ``exp2(x · log2(e) / T)`` (:func:`exp_scaled`): the scale folds into a
multiply the pass makes anyway, and torch's CPU ``exp2`` costs about a quarter of its ``exp``
(measured 0.20 vs 0.80 ns per float32 element, AVX-512, one thread; on GPUs both are
memory-bound). Rounding the scaled argument costs about ``6e-8 · |z - max| / T`` relative, most on
the terms that weigh least; torch's CPU ``exp2`` also takes the last < 32 elements of a buffer
through libm (both within 1 ulp), so results move by rounding with ``chunk_elements``. Backward
fuses the two terms with one ``addcmul``. Together: forward + backward at T = 2 went from 1.37×
megatron's cross-entropy to 0.63× (T = 1: 0.41× to 0.23×; ``tools/bench/bench_kd_loss.py``,
CPU time, 512 tokens × 131,072). The same kernels
(:func:`exp_sums_`, :func:`fill_grad_`) serve the output-layer-fused pass in
:mod:`kdscale.losses.head`.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable

LOG2E = math.log2(math.e)


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


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    """In-place all-reduce over ``group``; nothing for None or a one-rank group."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def shard_index(ids: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local column of each id in ``[start, start + width)`` (0 elsewhere) and the in-range mask."""
    inside = (ids >= start) & (ids < start + width)
    return torch.where(inside, ids - start, 0), inside


class Scratch:
    """Reusable contiguous float buffers, each sized by its first request's element count."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype, capacity: int) -> torch.Tensor:
        """A contiguous ``[rows, cols]`` view of buffer ``name`` (``capacity`` elements)."""
        if name not in self._flat:
            self._flat[name] = torch.empty(capacity, dtype=dtype, device=self._device)
        return self._flat[name][: rows * cols].view(rows, cols)


def exp_scaled(x: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = exp(scale · x)``, taken as ``exp2(scale · log2(e) · x)`` (``out`` may be ``x``)."""
    return torch.mul(x, scale * LOG2E, out=out).exp2_()


def zero_support_and_sum(
    e: torch.Tensor, idx: torch.Tensor, inside: torch.Tensor, restore: bool
) -> torch.Tensor:
    """Row sums of ``e`` outside the support (zeroed exactly: e - e == 0), optionally restored."""
    e_sup = e.gather(1, idx).masked_fill_(~inside, 0.0)
    e.scatter_add_(1, idx, e_sup.neg())
    total = e.sum(1)
    if restore:  # off-range slots point at column 0 with a 0 added: harmless
        e.scatter_add_(1, idx, e_sup)
    return total


def exp_sums_(
    x: torch.Tensor,
    sup_idx: torch.Tensor,
    sup_in: torch.Tensor,
    temperature: float,
    scratch: torch.Tensor | None,
    restore: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For shifted logits ``x = z - max`` (rows × columns): the row sums of ``exp(x / T)`` outside
    the support, and at ``T != 1`` of ``exp(x)`` (into ``scratch``, same shape). ``x`` becomes
    ``exp(x / T)``, its support entries zeroed unless ``restore``."""
    lm_sum = None
    if temperature != 1.0:
        assert scratch is not None
        lm_sum = exp_scaled(x, 1.0, out=scratch).sum(1)
    exp_scaled(x, 1.0 / temperature, out=x)
    return zero_support_and_sum(x, sup_idx, sup_in, restore), lm_sum


class Normaliser(NamedTuple):
    """Per-token quantities forward saves for backward (no vocab-sized tensor)."""

    max_N: torch.Tensor
    s_total_N: torch.Tensor
    s_tail_N: torch.Tensor
    s_lm_N: torch.Tensor
    e_sup_NK: torch.Tensor
    valid_NK: torch.Tensor


def finish_forward(
    packed: torch.Tensor,
    max_N: torch.Tensor,
    ids_NK: torch.Tensor,
    labels_N: torch.Tensor,
    temperature: float,
) -> tuple[SparseLogSoftmax, Normaliser]:
    """The outputs and the saved normaliser from the all-reduced packed columns: ``[0, K)`` logits
    at the ids, ``K`` the label logit, ``K+1`` the sum of ``exp((z - max)/T)`` outside the support,
    ``K+2`` (``T != 1`` only) the sum of ``exp(z - max)``."""
    k = ids_NK.shape[1]
    valid = ids_NK >= 0
    shift_NK = ((packed[:, :k] - max_N[:, None]) * (1.0 / temperature)).masked_fill_(
        ~valid, float("-inf")
    )
    e_sup_NK = shift_NK.exp()
    s_tail_N = packed[:, k + 1]
    s_total_N = s_tail_N + e_sup_NK.sum(1)
    log_total_N = s_total_N.log()
    s_lm_N = packed[:, k + 2] if temperature != 1.0 else s_total_N
    nll_N = (max_N + s_lm_N.log() - packed[:, k]).masked_fill_(labels_N < 0, 0.0)
    out = SparseLogSoftmax(shift_NK - log_total_N[:, None], s_tail_N.log() - log_total_N, nll_N)
    return out, Normaliser(max_N, s_total_N, s_tail_N, s_lm_N, e_sup_NK, valid)


class GradCoefficients(NamedTuple):
    """``d loss / d z_v = at_t·exp((z_v - max)/T) + at_1·exp(z_v - max) + sparse corrections``.

    ``at_t`` / ``at_1`` are per-token (None: term absent; at ``T = 1`` everything is in ``at_t``),
    ``sup_NK`` is added at the teacher ids and ``lab_N1`` at the label (None: term absent).
    """

    at_t_N: torch.Tensor | None
    at_1_N: torch.Tensor | None
    sup_NK: torch.Tensor | None
    lab_N1: torch.Tensor | None
    temperature: float


def grad_coefficients(
    norm: Normaliser,
    g_NK: torch.Tensor | None,
    g_tail_N: torch.Tensor | None,
    g_nll_N: torch.Tensor | None,
    temperature: float,
) -> GradCoefficients | None:
    """Backward's per-token coefficients from the output gradients (None: nothing to do).

    With ``e_v = exp(s_v - max)``:
      ``log q_i    = s_i - log S_total``         → ``g_i·(δ_iv - e_v / S_total)``
      ``log q_tail = log S_tail - log S_total``  → ``g_tail·([v ∉ support]·e_v / S_tail - e_v / S_total)``
    and the LM term adds ``g_nll·(e1_v / S_lm - δ_v,label)`` with ``e1_v = exp(z_v - max)``; all
    ``d/ds`` terms carry ``1/T`` for ``d/dz``.
    """
    kd, lm = g_NK is not None or g_tail_N is not None, g_nll_N is not None
    if not (kd or lm):
        return None
    inv_t = 1.0 / temperature
    at_t = at_1 = sup = lab = None
    if kd:
        g_NK = torch.zeros_like(norm.e_sup_NK) if g_NK is None else g_NK.masked_fill(~norm.valid_NK, 0.0)
        g_tail_N = torch.zeros_like(norm.s_tail_N) if g_tail_N is None else g_tail_N
        # S_tail == 0 means every non-support e_v is 0, so this coefficient multiplies nothing.
        tail_ratio_N = torch.where(norm.s_tail_N > 0, g_tail_N / norm.s_tail_N, 0.0)
        at_t = (tail_ratio_N - (g_NK.sum(1) + g_tail_N) / norm.s_total_N) * inv_t
        sup = (g_NK - norm.e_sup_NK * tail_ratio_N[:, None]) * inv_t
    if lm:
        at_1 = g_nll_N / norm.s_lm_N
        lab = (-g_nll_N).unsqueeze(1)
    if temperature == 1.0 and at_1 is not None:  # at T = 1 one exponential serves both terms
        at_t, at_1 = at_1 if at_t is None else at_t + at_1, None
    return GradCoefficients(at_t, at_1, sup, lab, temperature)


def fill_grad_(
    x: torch.Tensor,
    coef: GradCoefficients,
    rows: slice,
    sup_idx: torch.Tensor,
    sup_in: torch.Tensor,
    lab_idx: torch.Tensor,
    lab_in: torch.Tensor,
    scratch: torch.Tensor | None,
    exp_done: bool = False,
) -> torch.Tensor:
    """Turn ``x`` (``z - max`` for token ``rows`` × some columns) into ``d loss / d z`` in place.

    ``sup_idx``/``sup_in`` and ``lab_idx``/``lab_in`` (rows already cut) place the teacher ids
    and the label in these columns. ``exp_done``: ``x`` already holds ``exp(z - max)`` (T = 1).
    ``scratch`` (same shape as ``x``) is needed when both exponentials are live.
    """
    at_t = None if coef.at_t_N is None else coef.at_t_N[rows, None]
    at_1 = None if coef.at_1_N is None else coef.at_1_N[rows, None]
    if exp_done:
        x.mul_(at_t)
    elif at_t is not None and at_1 is not None:  # T != 1, KD and LM: x ← e1·at_1 + e_T·at_t
        assert scratch is not None
        e_t = exp_scaled(x, 1.0 / coef.temperature, out=scratch)
        exp_scaled(x, 1.0, out=x).mul_(at_1).addcmul_(e_t, at_t)
    elif at_t is not None:
        exp_scaled(x, 1.0 / coef.temperature, out=x).mul_(at_t)
    else:  # the LM term alone at T != 1
        exp_scaled(x, 1.0, out=x).mul_(at_1)
    if coef.sup_NK is not None:
        x.scatter_add_(1, sup_idx, coef.sup_NK[rows].masked_fill(~sup_in, 0.0))
    if coef.lab_N1 is not None:
        x.scatter_add_(1, lab_idx, coef.lab_N1[rows].masked_fill(~lab_in, 0.0))
    return x


def _row_slices(rows: int, width: int, chunk_elements: int) -> list[slice]:
    step = max(1, min(rows, chunk_elements // max(width, 1)))
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)]


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
        separate_lm = temperature != 1.0
        store = storage is Storage.STORE_EXP
        assert not (store and (separate_lm or logits_SBV.dtype != cdt))
        rank = group_rank_size(tp_group)[0]
        z_NV = logits_SBV.reshape(n_rows, width)
        sup_idx, sup_in = shard_index(ids_NK, rank * width, width)
        lab_idx, lab_in = shard_index(labels_N.unsqueeze(1), rank * width, width)

        max_N = z_NV.amax(dim=1).to(cdt)
        all_reduce(max_N, dist.ReduceOp.MAX, tp_group)

        # Packed columns (see finish_forward), gathered before the chunk loop, which may
        # overwrite the logits.
        packed = torch.empty(n_rows, k + 2 + int(separate_lm), dtype=cdt, device=z_NV.device)
        packed[:, :k] = z_NV.gather(1, sup_idx).to(cdt).masked_fill_(~sup_in, 0.0)
        packed[:, k] = z_NV.gather(1, lab_idx).to(cdt).masked_fill_(~lab_in, 0.0).squeeze(1)
        slices = _row_slices(n_rows, width, chunk_elements)
        scratch, capacity = Scratch(z_NV.device), (slices[0].stop - slices[0].start) * width
        for rows in slices:
            n = rows.stop - rows.start
            if store:
                x = z_NV[rows]
            else:
                x = scratch.take("x", n, width, cdt, capacity).copy_(z_NV[rows])
            x.sub_(max_N[rows, None])
            u = scratch.take("u", n, width, cdt, capacity) if separate_lm else None
            tail, lm = exp_sums_(x, sup_idx[rows], sup_in[rows], temperature, u, restore=store)
            packed[rows, k + 1] = tail
            if lm is not None:
                packed[rows, k + 2] = lm
        all_reduce(packed, dist.ReduceOp.SUM, tp_group)

        out, norm = finish_forward(packed, max_N, ids_NK, labels_N, temperature)
        ctx.save_for_backward(logits_SBV, sup_idx, sup_in, lab_idx, lab_in, *norm)
        ctx.temperature, ctx.storage, ctx.chunk_elements = temperature, storage, chunk_elements
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx,
        g_NK: torch.Tensor | None,
        g_tail_N: torch.Tensor | None,
        g_nll_N: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        logits_SBV, sup_idx, sup_in, lab_idx, lab_in, *saved = ctx.saved_tensors
        norm = Normaliser(*saved)
        coef = grad_coefficients(norm, g_NK, g_tail_N, g_nll_N, ctx.temperature)
        if coef is None:
            return (None,) * 7
        n_rows, width = norm.max_N.shape[0], logits_SBV.shape[-1]
        cdt = norm.max_N.dtype

        z_NV = logits_SBV.reshape(n_rows, width)
        storage = ctx.storage
        grad_NV = torch.empty_like(z_NV) if storage is Storage.SEPARATE else z_NV
        direct = z_NV.dtype == cdt  # work in the output chunk itself, no float copy
        slices = _row_slices(n_rows, width, ctx.chunk_elements)
        scratch, capacity = Scratch(z_NV.device), (slices[0].stop - slices[0].start) * width
        two_exps = coef.at_t_N is not None and coef.at_1_N is not None
        store = storage is Storage.STORE_EXP
        for rows in slices:
            n = rows.stop - rows.start
            if store:  # already exp(z - max): T = 1
                x = grad_NV[rows]
            elif direct:
                x = torch.sub(z_NV[rows], norm.max_N[rows, None], out=grad_NV[rows])
            else:
                x = scratch.take("x", n, width, cdt, capacity).copy_(z_NV[rows])
                x.sub_(norm.max_N[rows, None])
            u = scratch.take("u", n, width, cdt, capacity) if two_exps else None
            fill_grad_(
                x, coef, rows, sup_idx[rows], sup_in[rows], lab_idx[rows], lab_in[rows], u,
                exp_done=store,
            )  # fmt: skip
            if not direct:
                grad_NV[rows].copy_(x)
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
