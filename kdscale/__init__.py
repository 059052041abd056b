"""kdscale: distributed pretraining distillation for LLMs (teacher-logit cache → megatron-core student)."""

from kdscale.logging import quiet_third_party

__version__ = "0.1.0"

quiet_third_party()  # before any stage imports megatron, DeepSpeed or transformers
