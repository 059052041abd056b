"""The megatron-core teacher backend: a kdscale checkpoint (``kdscale train``/``import-hf``/``prune``).

The model is rebuilt from the checkpoint's ``model.yaml`` at ``tensor × pipeline`` (default
1 × 1: this process alone) and each rank loads only its own shard of the weights
(dist_checkpointing reshards any saved layout). A group of ranks joins the process group its
launcher set up in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: one Ray actor
per rank, :mod:`kdscale.cache.groups`) and builds megatron's parallel state for that group alone.

Inference needs no pipeline schedule: stage ``s`` receives the hidden states ``[S, B, H]`` of
stage ``s - 1`` (the first embeds the tokens), runs its layers and sends them on; the last stage
returns the final-norm hidden states, and the output layer and log-softmax then run ``chunk``
positions at a time. The output layer is vocab-parallel: a tensor rank yields its shard
``[B, c, V/T]`` of log-probs normalized over the whole vocabulary (max and log-sum-exp are
all-reduced), never the gathered vocabulary; :attr:`MegatronTeacher.vocab_shard` says which ids.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from kdscale.config import ParallelConfig
from kdscale.teacher.base import VocabShard, check_tokens, weights_fingerprint


class MegatronTeacher:
    """A megatron-core GPTModel loaded from a kdscale checkpoint, for scoring only (this
    process's rank of a ``tensor × pipeline`` layout)."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        tensor: int = 1,
        pipeline: int = 1,
        dtype: str = "float32",
    ) -> None:
        from megatron.core import parallel_state

        from kdscale.models import build_gpt_model
        from kdscale.models.checkpoints import load_weights, open_model_dir
        from kdscale.models.gpt import validate_layout
        from kdscale.models.parallel import parallel_session

        self.parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
        ckpt, self.model_config = open_model_dir(checkpoint, "cache.teacher.model")
        validate_layout(self.model_config, self.parallel, tensor * pipeline)  # before any group
        self._session = contextlib.ExitStack()  # megatron's groups live as long as the teacher
        self._session.enter_context(parallel_session(self.parallel))
        self._first = parallel_state.is_pipeline_first_stage()
        self._last = parallel_state.is_pipeline_last_stage()
        self._pipeline = parallel_state.get_pipeline_model_parallel_group()
        self._prev = None if self._first else parallel_state.get_pipeline_model_parallel_prev_rank()
        self._next = None if self._last else parallel_state.get_pipeline_model_parallel_next_rank()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self._shard = None
        if tensor > 1:
            width = self.model_config.vocab_size // tensor
            self._shard = VocabShard(
                parallel_state.get_tensor_model_parallel_group(), tensor, tp_rank * width,
                self.model_config.vocab_size,
            )  # fmt: skip
        self._writes = self._last and tp_rank == 0
        gpt = build_gpt_model(
            self.model_config, self.parallel, pre_process=self._first, post_process=self._last,
            returns="hidden",
        )  # fmt: skip
        load_weights(ckpt, [gpt])
        self.gpt = gpt.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
        self._fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (kdscale never pads it)."""
        return self.model_config.vocab_size

    @property
    def vocab_shard(self) -> VocabShard | None:
        """This tensor rank's columns of the output layer; None at tensor = 1."""
        return self._shard

    @property
    def writes(self) -> bool:
        """Tensor rank 0 of the last pipeline stage encodes and writes."""
        return self._writes

    def logits_chunks(self, tokens: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logp[B, c, V])`` float32 next-token log-probs, ``chunk`` positions at a time
        (``[B, c, V/T]`` on a tensor rank; nothing on a stage before the last)."""
        check_tokens(tokens, self.vocab_size, chunk)
        with torch.no_grad():
            hidden_SBH = self._stage_forward(tokens.to(next(self.gpt.parameters()).device))
            if not self._last:
                return
            weight = self.gpt.output_weight()
            for start in range(0, tokens.shape[1], chunk):
                logits_cBV, _ = self.gpt.output_layer(hidden_SBH[start : start + chunk], weight=weight)
                yield start, self._log_softmax(logits_cBV.float().transpose(0, 1))

    def _stage_forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """This stage's layers over the batch: receives from the stage before, sends to the next
        (point-to-point, in the pipeline group)."""
        if not self._first:
            shape = (tokens_BS.shape[1], tokens_BS.shape[0], self.model_config.hidden_size)
            dtype = next(self.gpt.parameters()).dtype
            received_SBH = torch.empty(shape, dtype=dtype, device=tokens_BS.device)
            dist.recv(received_SBH, src=self._prev, group=self._pipeline)
            self.gpt.set_input_tensor(received_SBH)
        hidden_SBH = self.gpt(tokens_BS if self._first else None, None, None)
        if not self._last:
            dist.send(hidden_SBH.contiguous(), dst=self._next, group=self._pipeline)
        return hidden_SBH

    def _log_softmax(self, logits_BcV: torch.Tensor) -> torch.Tensor:
        if self._shard is None:
            return logits_BcV - logits_BcV.logsumexp(-1, keepdim=True)
        peak = logits_BcV.max(-1, keepdim=True).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self._shard.group)
        shifted = logits_BcV - peak
        total = shifted.exp().sum(-1, keepdim=True)
        dist.all_reduce(total, group=self._shard.group)
        return shifted - total.log()

    def close(self) -> None:
        """End megatron's parallel state (and a process group it made); the teacher is done."""
        self._session.close()

    def fingerprint(self) -> str:
        """``megatron:GPTModel:sha256:<hex>`` of the model config and every weight; a group's
        (collective) digests its ranks' digests in rank order, with the layout in its name."""
        if self._fingerprint is None:
            config = self.model_config.model_dump(mode="json")
            local = weights_fingerprint("megatron", "GPTModel", config, self.gpt.state_dict().items())
            size = self.parallel.tensor * self.parallel.pipeline
            if size == 1:
                self._fingerprint = local
            else:
                parts: list[str] = [""] * size
                dist.all_gather_object(parts, local)
                digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
                layout = f"tp{self.parallel.tensor}pp{self.parallel.pipeline}"
                self._fingerprint = f"megatron:GPTModel@{layout}:sha256:{digest}"
        return self._fingerprint
