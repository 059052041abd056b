"""``parallel`` section: the tensor × pipeline × data layout."""

from pydantic import Field

from kdscale.config.base import Section


class ParallelConfig(Section):
    """Model-parallel sizes; data parallel is world size / (tensor × pipeline)."""

    tensor: int = Field(1, ge=1, description="Tensor-parallel size.")
    pipeline: int = Field(1, ge=1, description="Pipeline-parallel size.")
    virtual_pipeline: int | None = Field(
        None, ge=2, description="Virtual (interleaved) stages per pipeline rank; None = off."
    )
