"""The trained DeepSpeed student as a Hugging Face directory (``<out>/hf``).

Under ZeRO-3 every rank holds a slice of each parameter; ``deepspeed.zero.GatheredParameters``
assembles the full tensors for the duration of the save (a no-op at stages 1 and 2). Rank 0
writes ``config.json`` + ``model.safetensors`` with ``save_pretrained`` (in the dtype the
engine computes with: fp32, or bf16) and the tokenizer of the starting model when it had one.
The directory appears atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from kdscale.io import atomic_directory
from kdscale.logging import get_logger

log = get_logger(__name__)

HF_EXPORT = "hf"


def export_hf_dir(engine: Any, out: Path, tokenizer: Path | None) -> Path:
    """Write the engine's model to ``out`` (collective; replaces an older export)."""
    import deepspeed

    module = engine.module.lm  # the transformers model inside CausalLMWithLoss
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if dist.get_rank() == 0:
            with atomic_directory(out, overwrite=True) as tmp:
                module.save_pretrained(tmp, safe_serialization=True)
                if tokenizer is not None:
                    from transformers import AutoTokenizer

                    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        log.info("exported the model to %s", out)
    return out
