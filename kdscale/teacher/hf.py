"""A Hugging Face transformers causal LM as a teacher (any local HF directory).

The body (``model.base_model``) runs once over the batch; the output layer and log-softmax
then run one ``chunk`` of positions at a time, so the ``[B, S, V]`` logits of a plain
``model(tokens)`` call never exist. Final-logit soft-capping (Gemma 2) is applied; at load
time a short probe checks that this path reproduces the model's own forward, so a model
that post-processes its logits differently is refused rather than silently mis-scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from kdscale.errors import KDScaleError
from kdscale.logging import get_logger
from kdscale.teacher.base import check_tokens, weights_fingerprint

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PROBE_TOKENS = 8


class HFTeacher:
    """A transformers ``AutoModelForCausalLM`` loaded from ``model_dir`` for scoring only."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise KDScaleError(f"cache.teacher.dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
        self.model_dir = Path(model_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=DTYPES[dtype], use_safetensors=True  # never a pickle
            )
        except (OSError, ValueError) as exc:
            raise KDScaleError(f"teacher {str(self.model_dir)!r}: cannot load ({exc})") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self._body = self.model.base_model
        self._head = self.model.get_output_embeddings()
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._fingerprint: str | None = None
        self._check_against_forward()

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (may exceed the tokenizer's vocabulary when padded)."""
        return int(self._head.weight.shape[0])

    @property
    def vocab_shard(self) -> None:
        """The whole vocabulary is in every chunk."""
        return None

    @property
    def writes(self) -> bool:
        """One process: it writes."""
        return True

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return self._head.weight.device

    def logits_chunks(
        self, tokens: torch.Tensor, chunk: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Float32 next-token log-probs ``(start, logp[B, c, V])``, ``chunk`` at a time."""
        check_tokens(tokens, self.vocab_size, chunk)
        with torch.no_grad():
            hidden = self._body(input_ids=tokens.to(self.device), use_cache=False).last_hidden_state
        for start in range(0, tokens.shape[1], chunk):
            with torch.no_grad():
                logp = self._log_probs(hidden[:, start : start + chunk])
            yield start, logp

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap).mul_(self._softcap)
        return logits.sub_(logits.logsumexp(-1, keepdim=True))

    def _check_against_forward(self) -> None:
        probe = torch.arange(_PROBE_TOKENS, device=self.device)[None] % self.vocab_size
        with torch.no_grad():
            expected = torch.log_softmax(self.model(input_ids=probe).logits.float(), dim=-1)
        _, got = next(self.logits_chunks(probe, _PROBE_TOKENS))
        # A check of the code path, not of numerics: both sides run the same ops on the same
        # shapes (one chunk), so any real difference is a missing logit transform.
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
            raise KDScaleError(
                f"teacher {str(self.model_dir)!r}: body + output layer does not reproduce the "
                f"model's forward (max |diff| {float((got - expected).abs().max()):.3g}); this "
                "architecture post-processes its logits in a way the hf backend does not support"
            )

    def fingerprint(self) -> str:
        """``hf:<architecture>:sha256:<hex>`` of the config and every weight (see
        :func:`~kdscale.teacher.base.weights_fingerprint`)."""
        if self._fingerprint is None:
            volatile = {"transformers_version", "dtype", "torch_dtype"}  # dtype: in the bytes
            config = {
                k: v
                for k, v in self.model.config.to_dict().items()
                if not k.startswith("_") and k not in volatile
            }
            arch = (self.model.config.architectures or [type(self.model).__name__])[0]
            self._fingerprint = weights_fingerprint("hf", arch, config, self.model.state_dict().items())
        return self._fingerprint
