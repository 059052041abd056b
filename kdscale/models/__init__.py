"""megatron-core student models: the GPT builder, HF conversion, and the CPU shim.

Importing this package makes megatron-core usable on a CPU-only torch (gloo): it applies
:func:`kdscale.models.cpu_shim.patch_megatron_for_cpu` once, and only when CUDA is absent.
Every kdscale module that uses megatron imports ``kdscale.models`` first and needs to know
nothing more about it.
"""

import torch

from kdscale.models.cpu_shim import patch_megatron_for_cpu

if not torch.cuda.is_available():
    patch_megatron_for_cpu()

from kdscale.models.gpt import (  # noqa: E402  (megatron is imported after the shim)
    build_gpt_model,
    build_model_chunks,
    count_parameters,
    transformer_config,
    validate_layout,
)

__all__ = [
    "build_gpt_model",
    "build_model_chunks",
    "count_parameters",
    "transformer_config",
    "validate_layout",
]
