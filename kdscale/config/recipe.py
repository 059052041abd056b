"""``recipe`` section: which stages ``kdscale run`` chains, and where their outputs go."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kdscale.config.base import InvalidKey, Section
from kdscale.stages import RECIPE_STAGES

RecipeStage = Literal[RECIPE_STAGES]


class RecipeSource(Section):
    """One data input of a recipe that blends several (``recipe.sources``)."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_-]+$",
        description="Source name: its tokens go to out/tokens/<name>, its cache to out/cache/<name>.",
    )  # fmt: skip
    inputs: list[str] = Field(..., min_length=1, description="Its inputs (as data.inputs).")
    eval_inputs: list[str] = Field(
        default_factory=list, description="Its held-out inputs (as data.eval_inputs)."
    )
    weight: float = Field(
        ..., gt=0, description="Its share of every training batch (becomes train.sources)."
    )


class RecipeConfig(Section):
    """A recipe run: its stages in order, each writing ``out/<stage output>``.

    Stage inputs and outputs left empty in the other sections are wired here: ``data`` writes
    ``out/tokens`` (with ``sources``: ``out/tokens/<name>`` per source, and ``cache`` likewise); ``teacher`` imports ``recipe.teacher`` into ``out/teacher``; ``prune`` cuts
    it to ``out/pruned``; ``cache`` runs the teacher into ``out/cache``; ``train`` distills the
    pruned model (when pruned) into ``out/student``; ``baseline`` trains the same student with
    the LM loss only into ``out/baseline``; ``export`` writes ``out/hf``; ``report`` evaluates
    everything on the held-out split into ``out/report``.
    """

    name: str = Field("", description="Recipe name (the W&B group is NAME-<run id>).")
    out: str = Field("", description="Root directory of the recipe run's outputs.")
    stages: list[RecipeStage] = Field(
        default_factory=lambda: ["data", "cache", "train", "export"],
        description=f"Stages to run, a subsequence of {', '.join(RECIPE_STAGES)}.",
    )
    sources: list[RecipeSource] = Field(
        default_factory=list,
        description="Several data inputs, each tokenized (with the data section's settings) and "
        "cached once, trained on as a weighted blend; empty: data.inputs is the one input. A "
        "changed weight re-runs training only.",
    )
    teacher: str = Field(
        "",
        description="Teacher HF directory or fixture name: what `teacher` imports for pruning "
        "and, unless cache.teacher.model is set, what the cache runs.",
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> "RecipeConfig":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise InvalidKey("sources", names, "source names must differ")
        return self

    @field_validator("stages")
    @classmethod
    def _in_order(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError("name at least one stage")
        positions = [RECIPE_STAGES.index(s) for s in stages]
        if positions != sorted(set(positions)):
            raise ValueError(f"stages must be distinct and in the order {', '.join(RECIPE_STAGES)}")
        return stages
