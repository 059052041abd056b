"""Training stage: the student on megatron-core or DeepSpeed ZeRO, one loop, checkpoints, metrics.

The public face, for code outside this package (recipes, tools)::

    from kdscale.train import evaluate_model, run
    run(cfg)                                        # `kdscale train`
    evaluate_model("runs/student", "runs/tokens", cache_dir="runs/cache")   # `kdscale eval`

Names resolve lazily, so importing the package (e.g. for ``kdscale eval --help``) loads neither
megatron nor DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "run": "kdscale.train.stage",
    "evaluate_model": "kdscale.train.evaluate",
    "EvalResult": "kdscale.train.evaluate",
    "check_batch": "kdscale.train.checks",
    "check_run": "kdscale.train.checks",
    "RunInputs": "kdscale.train.checks",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kdscale.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
