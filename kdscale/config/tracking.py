"""``wandb`` section: Weights & Biases monitoring (offline when no API key is present)."""

from typing import Literal

from pydantic import Field

from kdscale.config.base import Section


class WandbConfig(Section):
    """Where and how stages log to W&B."""

    enabled: bool = Field(True, description="Log to W&B at all (disabled → a no-op logger).")
    mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto = online when WANDB_API_KEY is set, else offline."
    )
    project: str = Field("kdscale", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    group: str | None = Field(None, description="Run group; `kdscale run` sets one per recipe run.")
    dir: str | None = Field(None, description="Local directory for W&B files (default: the stage's output).")
    tags: list[str] = Field(default_factory=list, description="Tags added to every run.")
