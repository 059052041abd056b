"""Logging set up once, in one place (rank-aware: only rank 0 logs at INFO), and the known
third-party warnings silenced here.

:func:`quiet_third_party` runs when ``kdscale`` is imported (so in every CLI process, spawned
rank and Ray actor, before megatron, DeepSpeed or transformers are): it ignores the warnings
listed in :data:`KNOWN_WARNINGS` — each by category, message and the module that issues it,
never a blanket ``ignore`` — drops DeepSpeed's accelerator lines and keeps W&B's console output to
its run directory. Anything not listed still shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from tqdm import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (category, message regex, regex of the issuing module): warnings every run would print, about
# optional kernels absent on purpose or deprecations inside the libraries themselves.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # megatron-core without Apex / Transformer Engine (CPU, or a GPU without them) falls back to
    # torch's norms, optimizers and multi-tensor ops, and says so at import.
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core"),
    (UserWarning, r"Apex is not installed", r"megatron\.core"),
    # megatron's dist_checkpointing loads through torch.distributed.checkpoint APIs that torch
    # deprecates, and through ShardedTensor (on CPU the call passes through the CPU shim).
    (FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     r"megatron\.core|kdscale\.models\.cpu_shim"),
)

# DeepSpeed logs which accelerator it picked on import, on its own logger and handler.
_DEEPSPEED_LINES = re.compile(r"Setting (ds_)?accelerator to ")


class _StderrHandler(logging.StreamHandler):
    """Writes each record to the ``sys.stderr`` of that moment, not the one at set-up (test
    harnesses and W&B's console capture replace it), above any tqdm bar on screen."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        with tqdm.external_write_mode(file=sys.stderr):
            super().emit(record)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where progress bars can be drawn)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def quiet_third_party() -> None:
    """Ignore the :data:`KNOWN_WARNINGS` and DeepSpeed's accelerator lines; keep W&B to its run
    directory lines (no history and summary dumps per stage: ``WANDB_QUIET=false`` brings them
    back); off a terminal, turn off the Hugging Face libraries' progress bars (written as
    ``\\r`` frames into log files). Idempotent; environment settings reach child processes."""
    os.environ.setdefault("WANDB_QUIET", "true")
    if not stderr_is_terminal():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    deepspeed = logging.getLogger("DeepSpeed")  # the logger DeepSpeed configures on import
    if not any(isinstance(f, _DropMessages) for f in deepspeed.filters):
        deepspeed.addFilter(_DropMessages(_DEEPSPEED_LINES))


def setup_logging(level: int | None = None) -> None:
    """Configure the root ``kdscale`` logger; non-zero ranks log warnings only."""
    rank = int(os.environ.get("RANK", "0"))
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    logger = logging.getLogger("kdscale")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """A child of the ``kdscale`` logger."""
    return logging.getLogger(name if name.startswith("kdscale") else f"kdscale.{name}")
