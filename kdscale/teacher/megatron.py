"""The megatron-core teacher backend: a kdscale checkpoint (``kdscale train``/``import-hf``/``prune``).

The model is rebuilt from the checkpoint's ``model.yaml`` at TP = PP = 1 in this process and its
weights loaded (dist_checkpointing reshards any saved layout). The decoder runs once over the
batch (its last stage returns the final-norm hidden states); the output layer and log-softmax
then run ``chunk`` positions at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from kdscale.config import ParallelConfig
from kdscale.teacher.base import check_tokens, weights_fingerprint


class MegatronTeacher:
    """A megatron-core GPTModel loaded from a kdscale checkpoint, for scoring only."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        from kdscale.models import build_gpt_model
        from kdscale.models.checkpoints import load_weights, open_model_dir
        from kdscale.models.parallel import parallel_session

        self._session = contextlib.ExitStack()  # megatron's groups live as long as the teacher
        self._session.enter_context(parallel_session(ParallelConfig()))
        ckpt, self.model_config = open_model_dir(checkpoint, "cache.teacher.model")
        gpt = build_gpt_model(
            self.model_config, ParallelConfig(), pre_process=True, post_process=True,
            returns="hidden",
        )  # fmt: skip
        load_weights(ckpt, [gpt])
        self.gpt = gpt.to(device).eval().requires_grad_(False)
        self._fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (kdscale never pads it)."""
        return self.model_config.vocab_size

    def logits_chunks(self, tokens: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logp[B, c, V])`` float32 next-token log-probs, ``chunk`` positions at a time."""
        check_tokens(tokens, self.vocab_size, chunk)
        weight = self.gpt.output_weight()
        with torch.no_grad():
            hidden_SBH = self.gpt(tokens.to(weight.device), None, None)
            for start in range(0, tokens.shape[1], chunk):
                logits_cBV, _ = self.gpt.output_layer(hidden_SBH[start : start + chunk], weight=weight)
                logits = logits_cBV.float().transpose(0, 1)
                yield start, logits - logits.logsumexp(-1, keepdim=True)

    def fingerprint(self) -> str:
        """``megatron:GPTModel:sha256:<hex>`` of the model config and every weight."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(
                "megatron", "GPTModel", self.model_config.model_dump(mode="json"), self.gpt.state_dict().items()
            )
        return self._fingerprint
