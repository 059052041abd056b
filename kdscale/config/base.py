"""The base class of every config section (strict, documented, assignment-validated), and the tags
fields carry for the code that treats groups of keys alike.

Tags live in a field's ``json_schema_extra`` (they also show in the JSON schema):

- ``runtime``: the key changes where, how fast or how often a stage works, logs or saves, never
  what it outputs (a recipe does not re-run a stage when only such keys change);
- ``checkpoint``: a model key that a checkpoint fixes — ``"shape"`` keys change the tensors it
  holds, ``"numerics"`` keys change what the same tensors compute.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict

RUNTIME = {"runtime": True}
SHAPE = {"checkpoint": "shape"}
NUMERICS = {"checkpoint": "numerics"}


class Section(BaseModel):
    """A config section. Unknown keys are errors; every field carries a description; numbers
    must be finite (``.inf``/``.nan`` are refused, naming the key)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )


def _tags(section: type[BaseModel], name: str) -> dict[str, Any]:
    extra = section.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def tagged_fields(section: type[BaseModel], tag: str, value: Any = True) -> tuple[str, ...]:
    """Names of ``section``'s fields whose tag ``tag`` equals ``value``."""
    return tuple(name for name in section.model_fields if _tags(section, name).get(tag) == value)


def runtime_keys(section: type[BaseModel], prefix: str) -> tuple[str, ...]:
    """Dotted keys (``prefix.name``; ``name`` for an empty prefix) of every ``runtime`` field
    under ``section``, nested sections included (a runtime section counts whole)."""
    keys: list[str] = []
    for name, field in section.model_fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if _tags(section, name).get("runtime"):
            keys.append(dotted)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += runtime_keys(field.annotation, dotted)
    return tuple(keys)


class InvalidKey(ValueError):
    """What a section's validator raises about one of its keys: the key (relative to the
    section), its value and the fix. The config loader reports it as one line,
    ``loss.missing_mass='renorm': <message>``, instead of the section's whole value."""

    def __init__(self, key: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.key, self.value, self.message = key, value, message
