"""Load, merge, validate and write configs; turn pydantic errors into one-line messages.

A YAML file may start from others: ``base: FILE`` (or a list of files; paths relative to the
file) loads those first and overlays this file's keys on them, so recipes that differ in a few
keys share one base (``configs/base/``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from kdscale.config.base import InvalidKey
from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text, read_text

if TYPE_CHECKING:
    from kdscale.config import KDScaleConfig

RESOLVED_CONFIG_NAME = "config.yaml"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise KDScaleError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. data.seq_len=512")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as exc:
        raise KDScaleError(f"--set {text!r}: value is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KDScaleError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: str | os.PathLike[str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One config file's tree, its ``base`` files merged under it."""
    p = Path(path)
    if not p.is_file():
        where = f" (base of {seen[-1]})" if seen else ""
        raise KDScaleError(f"config file {str(p)!r} not found{where}")
    if p.resolve() in seen:
        raise KDScaleError(f"config file {str(p)!r}: base files form a cycle")
    text = read_text(p, "config file")
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise KDScaleError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise KDScaleError(f"config file {str(p)!r} must hold a mapping of sections")
    bases = tree.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise KDScaleError(f"config file {str(p)!r}: base must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml(p.parent / base, (*seen, p.resolve())))
    return _deep_merge(merged, tree)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``key=value: what is allowed``. A section validator's complaint
    names its one key (:class:`~kdscale.config.base.InvalidKey`); a whole section is never
    printed as the value."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidKey):
            key = ".".join([*loc, cause.key])
            lines.append(f"{key}={cause.value!r}: {cause.message}")
            continue
        key = ".".join(loc) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (see `kdscale <stage> --help` for the schema)")
        elif err["type"] == "missing":
            lines.append(f"{key}: required")
        elif isinstance(err.get("input"), dict):  # a section: its keys are not the problem
            lines.append(f"{key}: {msg}")
        else:
            lines.append(f"{key}={err.get('input')!r}: {msg}")
    return "config error: " + "; ".join(lines)


def load_config(
    files: list[str] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> "KDScaleConfig":
    """Build the root config from ``base`` ← YAML ``files`` ← ``--set`` ``overrides``."""
    from kdscale.config import KDScaleConfig

    tree: dict[str, Any] = dict(base or {})
    for path in files or []:
        tree = _deep_merge(tree, _read_yaml(path))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    try:
        return KDScaleConfig.model_validate(tree)
    except ValidationError as exc:
        raise KDScaleError(format_validation_error(exc)) from None


def write_resolved_config(cfg: "KDScaleConfig", out_dir: str | os.PathLike[str]) -> Path:
    """Write the fully resolved config beside a stage's outputs (atomically)."""
    path = Path(out_dir) / RESOLVED_CONFIG_NAME
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
