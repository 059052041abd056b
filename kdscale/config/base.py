"""The base class of every config section: strict, documented, assignment-validated."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. Unknown keys are errors; every field carries a description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
