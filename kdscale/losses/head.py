"""The output layer fused into the sparse log-softmax: the logits never exist whole.

    out = head_sparse_log_softmax(hidden_SBH, weight_VH, ids_NK, labels_N, temperature=T,
                                  tp_group=tp_group)

returns what :func:`kdscale.losses.vocab_parallel.sparse_log_softmax` returns for the logits
``hidden_SBH @ weight_VHᵀ`` (megatron's ColumnParallelLinear output layer, no bias, vocab-parallel:
``weight_VH`` is this rank's ``[V/TP, H]`` shard, the output layer's or the tied embedding's), with
gradients for ``hidden_SBH`` and ``weight_VH``, and no ``[N, V/TP]`` tensor ever allocated.

Vocab blocks. Both passes walk this rank's vocab shard in blocks of ``w = chunk_elements // N``
columns (``N = S·B`` token rows). A block's logits ``[N, w] = h_NH @ W_wHᵀ`` go into one reused
float buffer; the matmul runs in the inputs' dtype, so bf16 logits are rounded exactly as the
output layer rounds them, and the loss math runs in float32 as for ``kd_lm_loss``.

- Forward: one matmul per block. Each token keeps a running max, and its sums of
  ``exp((z - max)/T)`` outside the support (and of ``exp(z - max)`` at ``T != 1``) are rescaled
  by ``exp((old max - new max)/T)`` when the max grows (the online softmax). The logits at the
  teacher ids and the label are picked up in the block that holds them. Over ``tp_group``: one
  MAX all-reduce of the per-token max, each rank rescales its sums to the global max, one SUM
  all-reduce of the packed per-token columns — the two collectives of the logits path, per call.
  Saved for backward: references to ``hidden`` and ``weight`` (alive anyway), per-token scalars and
  the ``[N, K]`` support values.
- Backward: each block's logits are recomputed (one more matmul), turned into ``d loss / d z`` in
  place by the logits path's own kernel (:func:`kdscale.losses.vocab_parallel.fill_grad_`), then
  ``grad_W[block] = G_Nwᵀ @ h_NH`` — each weight row written once, in the weight's dtype, no
  accumulator — and ``grad_h += G_Nw @ W_wH`` into a ``[N, H]`` float accumulator. bf16 inputs
  round ``G`` to bf16 before both matmuls, as the unfused bf16 logits' gradient is rounded. No
  communication inside: megatron's region functions reduce the hidden-state gradient over
  ``tp_group`` exactly as in ColumnParallelLinear (:func:`head_sparse_log_softmax`).

Temporaries: the block buffer (two at ``T != 1``, plus one in the inputs' dtype for bf16), the
``[N, H]`` accumulator, and per-token vectors. Cost: four matmuls of ``N·H·V/TP`` where the
unfused path has three, and the same exponentials as the logits path (see its docstring).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable

from kdscale.losses.vocab_parallel import (
    Normaliser,
    Scratch,
    SparseLogSoftmax,
    all_reduce,
    compute_dtype,
    exp_sums_,
    fill_grad_,
    finish_forward,
    grad_coefficients,
    group_rank_size,
    shard_index,
)


# Narrower blocks make poor matmuls (and MKL rounds widths below ~12 differently from wide ones).
MIN_BLOCK_COLUMNS = 64


class _LogitBlocks:
    """The logits ``h_NH @ weight_VHᵀ`` of one rank, one block of vocab columns at a time."""

    def __init__(
        self, h_NH: torch.Tensor, weight_VH: torch.Tensor, vocab_start: int, chunk_elements: int
    ) -> None:
        self.h_NH, self.weight_VH, self.vocab_start = h_NH, weight_VH, vocab_start
        rows, width = h_NH.shape[0], weight_VH.shape[0]
        count = -(-width // max(chunk_elements // max(rows, 1), MIN_BLOCK_COLUMNS))
        edges = [width * i // count for i in range(count + 1)]  # near-equal widths, no sliver
        self.columns = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
        self.cdt = compute_dtype(h_NH.dtype)
        self.capacity = rows * max(b - a for a, b in zip(edges[:-1], edges[1:]))
        self.scratch = Scratch(h_NH.device)

    def buffer(self, name: str, cols: slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A reused ``[N, w]`` buffer for ``cols`` (compute dtype unless given)."""
        n, w = self.h_NH.shape[0], cols.stop - cols.start
        return self.scratch.take(name, n, w, dtype or self.cdt, self.capacity)

    def logits(self, cols: slice) -> torch.Tensor:
        """The block's logits in the compute dtype (a reused buffer)."""
        z = self.buffer("z", cols)
        w_wH = self.weight_VH[cols]
        if self.h_NH.dtype == self.cdt:
            return torch.mm(self.h_NH, w_wH.t(), out=z)
        return z.copy_(torch.mm(self.h_NH, w_wH.t(), out=self.buffer("low", cols, self.h_NH.dtype)))

    def index(self, ids: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Column of each global id within the block, and whether it is there."""
        return shard_index(ids, self.vocab_start + cols.start, cols.stop - cols.start)


def _rescale_(sums_NC: torch.Tensor, delta_N: torch.Tensor, temperature: float) -> None:
    """Sums taken at one max, moved to a max ``-delta`` higher: column 0 at ``T``, 1 at ``T = 1``."""
    delta_N = delta_N.nan_to_num(nan=0.0)  # -inf - -inf: nothing summed yet on either side
    sums_NC[:, 0] *= torch.exp(delta_N / temperature)
    if sums_NC.shape[1] > 1:
        sums_NC[:, 1] *= torch.exp(delta_N)


class _HeadSparseLogSoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        hidden_SBH: torch.Tensor,
        weight_VH: torch.Tensor,
        ids_NK: torch.Tensor,
        labels_N: torch.Tensor,
        temperature: float,
        tp_group: dist.ProcessGroup | None,
        chunk_elements: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        (n_rows, k), separate_lm = ids_NK.shape, temperature != 1.0
        rank = group_rank_size(tp_group)[0]
        h_NH = hidden_SBH.reshape(n_rows, hidden_SBH.shape[-1])
        blocks = _LogitBlocks(h_NH, weight_VH, rank * weight_VH.shape[0], chunk_elements)
        cdt, device = blocks.cdt, h_NH.device

        max_N = torch.full((n_rows,), float("-inf"), dtype=cdt, device=device)
        picked_NK1 = torch.zeros(n_rows, k + 1, dtype=cdt, device=device)  # ids' logits, label's
        sums_NC = torch.zeros(n_rows, 1 + int(separate_lm), dtype=cdt, device=device)
        labels_N1 = labels_N.unsqueeze(1)
        for cols in blocks.columns:
            z = blocks.logits(cols)
            sup_idx, sup_in = blocks.index(ids_NK, cols)
            lab_idx, lab_in = blocks.index(labels_N1, cols)
            picked_NK1[:, :k] += z.gather(1, sup_idx).masked_fill_(~sup_in, 0.0)
            picked_NK1[:, k:] += z.gather(1, lab_idx).masked_fill_(~lab_in, 0.0)
            new_max_N = torch.maximum(max_N, z.amax(1))
            _rescale_(sums_NC, max_N - new_max_N, temperature)
            max_N = new_max_N
            z.sub_(max_N[:, None])
            scratch = blocks.buffer("u", cols) if separate_lm else None
            tail_N, lm_N = exp_sums_(z, sup_idx, sup_in, temperature, scratch, restore=False)
            sums_NC[:, 0] += tail_N
            if lm_N is not None:
                sums_NC[:, 1] += lm_N
        if group_rank_size(tp_group)[1] > 1:
            local_max_N = max_N.clone()
            all_reduce(max_N, dist.ReduceOp.MAX, tp_group)
            _rescale_(sums_NC, local_max_N - max_N, temperature)
        packed = torch.cat([picked_NK1, sums_NC], 1)
        all_reduce(packed, dist.ReduceOp.SUM, tp_group)

        out, norm = finish_forward(packed, max_N, ids_NK, labels_N, temperature)
        ctx.save_for_backward(hidden_SBH, weight_VH, ids_NK, labels_N, *norm)
        ctx.temperature, ctx.tp_rank, ctx.chunk_elements = temperature, rank, chunk_elements
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx,
        g_NK: torch.Tensor | None,
        g_tail_N: torch.Tensor | None,
        g_nll_N: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        hidden_SBH, weight_VH, ids_NK, labels_N, *saved = ctx.saved_tensors
        norm = Normaliser(*saved)
        coef = grad_coefficients(norm, g_NK, g_tail_N, g_nll_N, ctx.temperature)
        need_h, need_w = ctx.needs_input_grad[:2]
        if coef is None or not (need_h or need_w):
            return (None,) * 7
        n_rows, hidden = norm.max_N.shape[0], hidden_SBH.shape[-1]
        h_NH = hidden_SBH.reshape(n_rows, hidden)
        blocks = _LogitBlocks(h_NH, weight_VH, ctx.tp_rank * weight_VH.shape[0], ctx.chunk_elements)
        low = h_NH.dtype != blocks.cdt  # bf16/fp16: G is rounded to it before the matmuls
        grad_W = weight_VH.new_empty(weight_VH.shape) if need_w else None  # contiguous rows
        grad_h_NH = torch.zeros(n_rows, hidden, dtype=blocks.cdt, device=h_NH.device)
        two_exps = coef.at_t_N is not None and coef.at_1_N is not None
        every_row, labels_N1 = slice(0, n_rows), labels_N.unsqueeze(1)
        for cols in blocks.columns:
            x = blocks.logits(cols).sub_(norm.max_N[:, None])
            sup_idx, sup_in = blocks.index(ids_NK, cols)
            lab_idx, lab_in = blocks.index(labels_N1, cols)
            scratch = blocks.buffer("u", cols) if two_exps else None
            fill_grad_(x, coef, every_row, sup_idx, sup_in, lab_idx, lab_in, scratch)
            g_Nw = blocks.buffer("low", cols, h_NH.dtype).copy_(x) if low else x
            if need_w:
                torch.mm(g_Nw.t(), h_NH, out=grad_W[cols])
            if need_h and low:
                grad_h_NH += torch.mm(g_Nw, weight_VH[cols])
            elif need_h:
                grad_h_NH.addmm_(g_Nw, weight_VH[cols])
        grad_h = grad_h_NH.to(hidden_SBH.dtype).view(hidden_SBH.shape) if need_h else None
        return grad_h, grad_W, None, None, None, None, None


def head_sparse_log_softmax(
    hidden_SBH: torch.Tensor,
    weight_VH: torch.Tensor,
    ids_NK: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    chunk_elements: int = 1 << 21,
    sequence_parallel: bool = False,
) -> SparseLogSoftmax:
    """:func:`~kdscale.losses.vocab_parallel.sparse_log_softmax` of ``hidden_SBH @ weight_VHᵀ``
    without the logits; see the module docstring. ``ids_NK``/``labels_N`` as there.

    Over ``tp_group`` the hidden states enter as megatron's ColumnParallelLinear takes them:
    through ``copy_to_tensor_model_parallel_region`` (gradient all-reduced), or with
    ``sequence_parallel`` as this rank's ``[S/TP, B, H]`` slice through
    ``gather_from_sequence_parallel_region`` (all-gathered; gradient reduce-scattered).
    """
    if group_rank_size(tp_group)[1] > 1:
        from megatron.core import tensor_parallel

        if sequence_parallel:
            hidden_SBH = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_SBH, tensor_parallel_output_grad=True, group=tp_group
            )
        else:
            hidden_SBH = tensor_parallel.copy_to_tensor_model_parallel_region(
                hidden_SBH, group=tp_group
            )
    return SparseLogSoftmax(
        *_HeadSparseLogSoftmaxFn.apply(
            hidden_SBH, weight_VH, ids_NK, labels_N, temperature, tp_group, chunk_elements
        )
    )
