"""kdscale: distributed pretraining distillation for LLMs (teacher-logit cache → megatron-core student)."""

__version__ = "0.1.0"
