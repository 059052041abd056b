"""What a DeepSpeed run verifies before any model is built, then the shared ``check_run``.

The deepspeed-only rules (data parallel only, fp32/bf16, where the weights come from, a resumed
run's engine, world size and ZeRO stage) fail first with one line naming the keys; the
architecture is taken from ``train.deepspeed.model`` and the run is then checked exactly as a
megatron run (layout, batch split, tokens and cache against that architecture, resume inputs).
"""

from __future__ import annotations

from kdscale.config import KDScaleConfig
from kdscale.errors import KDScaleError
from kdscale.logging import get_logger
from kdscale.models.checkpoints import read_train_state
from kdscale.train.checks import RunInputs, check_run
from kdscale.train.deepspeed_engine.start import Start, resolve_start

log = get_logger(__name__)


def _check_config(cfg: KDScaleConfig) -> None:
    parallel, train = cfg.parallel, cfg.train
    if parallel.tensor > 1 or parallel.pipeline > 1 or parallel.virtual_pipeline:
        raise KDScaleError(
            f"train.engine=deepspeed is data parallel only: parallel.tensor={parallel.tensor}, "
            f"parallel.pipeline={parallel.pipeline}, parallel.virtual_pipeline="
            f"{parallel.virtual_pipeline} must be 1, 1, null (use train.engine=megatron)"
        )
    if cfg.model.precision not in ("fp32", "bf16"):
        raise KDScaleError(
            f"model.precision={cfg.model.precision!r} with train.engine=deepspeed: choose fp32 "
            "or bf16 (fp8 needs train.engine=megatron with Transformer Engine)"
        )
    if cfg.model.hidden_dropout:
        raise KDScaleError(
            f"model.hidden_dropout={cfg.model.hidden_dropout} with train.engine=deepspeed: "
            "transformers' Llama has no hidden dropout; set it to 0"
        )
    if train.init:
        raise KDScaleError(
            f"train.init={train.init!r} with train.engine=deepspeed: set "
            "train.deepspeed.model instead (an HF directory, a fixture or a kdscale model dir)"
        )
    if train.use_distributed_optimizer:
        raise KDScaleError(
            "train.use_distributed_optimizer=true with train.engine=deepspeed: ZeRO shards the "
            "optimizer already (train.deepspeed.zero_stage); set it to false"
        )


def check_deepspeed_run(cfg: KDScaleConfig, world_size: int) -> tuple[KDScaleConfig, RunInputs, Start]:
    """Verify a DeepSpeed run; returns the config with the starting model's architecture, the
    checked inputs and the start. Raises KDScaleError naming the first problem."""
    _check_config(cfg)
    start = resolve_start(cfg.train.deepspeed.model, cfg.model)
    if start.kind != "random" and start.model != cfg.model:
        log.info("the architecture comes from train.deepspeed.model=%s", start.path)
    cfg = cfg.model_copy(update={"model": start.model})
    inputs = check_run(cfg, world_size)
    if inputs.resume_from is not None:
        saved = read_train_state(inputs.resume_from)  # the engine is checked by check_run
        now = {"world_size": world_size, "zero_stage": cfg.train.deepspeed.zero_stage}
        for key, value in now.items():
            if saved[key] != value:
                what = "ranks" if key == "world_size" else "train.deepspeed.zero_stage"
                raise KDScaleError(
                    f"train.out: the run in {cfg.train.out} was saved with {key}={saved[key]}, "
                    f"this one has {value}; resume with the same {what}, or start a new run "
                    f"from its weights"
                )
    return cfg, inputs, start
