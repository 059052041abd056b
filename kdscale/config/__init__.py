"""One typed schema for every stage: YAML files, then ``--set a.b=c`` overrides.

Precedence: ``--set`` > later YAML files > earlier YAML files > defaults. Unknown keys and bad
values are errors naming the dotted key, the value and what is allowed. Each stage package
owns one section module here; the root composes them.

Example::

    cfg = load_config(["configs/quickstart.yaml"], ["data.seq_len=512"])
    write_resolved_config(cfg, "runs/data")
"""

from pydantic import Field

from kdscale.config.base import Section
from kdscale.config.cache import CacheConfig
from kdscale.config.data import DataConfig
from kdscale.config.integrity import IntegrityConfig
from kdscale.config.loader import load_config, parse_override, write_resolved_config
from kdscale.config.loss import KDLossConfig
from kdscale.config.model import ModelConfig
from kdscale.config.parallel import ParallelConfig
from kdscale.config.prune import PruneConfig, PruneSearch, PruneTarget
from kdscale.config.recipe import RecipeConfig
from kdscale.config.tracking import WandbConfig
from kdscale.config.train import TrainConfig


class KDScaleConfig(Section):
    """The root config: one section per stage."""

    data: DataConfig = Field(default_factory=DataConfig, description="Token data stage.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Teacher-target cache.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Student architecture.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Layout.")
    loss: KDLossConfig = Field(default_factory=KDLossConfig, description="KD + LM objective.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="W&B monitoring.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="Structured pruning.")
    recipe: RecipeConfig = Field(default_factory=RecipeConfig, description="`kdscale run` stages.")
    integrity: IntegrityConfig = Field(
        default_factory=IntegrityConfig, description="Checksum verification of inputs."
    )


__all__ = [
    "CacheConfig",
    "DataConfig",
    "IntegrityConfig",
    "KDLossConfig",
    "KDScaleConfig",
    "ModelConfig",
    "ParallelConfig",
    "PruneConfig",
    "PruneSearch",
    "PruneTarget",
    "RecipeConfig",
    "Section",
    "TrainConfig",
    "WandbConfig",
    "load_config",
    "parse_override",
    "write_resolved_config",
]
