"""Config schema and CLI: YAML + --set precedence, one-line errors, exit status 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdscale.cli import main
from kdscale.config import load_config, write_resolved_config
from kdscale.errors import KDScaleError


def test_help_lists_stage_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kdscale.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "data" in out and "Tokenize" in out


def test_yaml_then_set_precedence(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"data": {"seq_len": 64, "shard_samples": 7}, "model": {"num_layers": 3}}))
    second.write_text(yaml.safe_dump({"data": {"seq_len": 128}}))
    cfg = load_config([str(first), str(second)], ["data.shard_samples=9", "model.tie_embeddings=false"])
    assert cfg.data.seq_len == 128  # later file wins
    assert cfg.data.shard_samples == 9  # --set wins over files
    assert cfg.model.num_layers == 3  # untouched keys survive the merge
    assert cfg.model.tie_embeddings is False  # values are parsed as YAML


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.seq_len=33", "data.inputs=[a, b]"])
    path = write_resolved_config(cfg, tmp_path)
    assert load_config([str(path)]) == cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.seq_len=1", "data.seq_len=1: Input should be greater than or equal to 2"),
        ("data.eval_fraction=1.5", "data.eval_fraction=1.5: Input should be less than 1"),
        ("data.separator=tab", "data.separator='tab': Input should be 'eos' or 'none'"),
        ("data.no_such_key=3", "data.no_such_key: unknown key"),
        ("model.num_query_groups=3",
         "model.num_attention_heads=4: must be a multiple of model.num_query_groups=3"),
        ("train.lr.warmup_steps=2000",
         "train.lr.warmup_steps=2000: must be below train.steps=1000"),
    ],
)
def test_bad_value_names_field_value_and_rule(override: str, expected: str) -> None:
    with pytest.raises(KDScaleError) as info:
        load_config(None, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_section_check_names_its_one_key_and_the_fix() -> None:
    with pytest.raises(KDScaleError) as info:
        load_config(None, ["loss.missing_mass=renorm"])
    message = str(info.value)
    assert message.startswith("config error: loss.missing_mass='renorm': needs an LM term")
    assert "set loss.missing_mass=tail" in message and "loss.allow_renorm_without_lm=true" in message
    assert "{" not in message and "divergence" not in message  # not the loss section's dump


@pytest.mark.parametrize("override", ["seq_len", "=3", "data..seq_len=3", "data.seq_len=[unclosed"])
def test_malformed_override_is_rejected(override: str) -> None:
    with pytest.raises(KDScaleError, match="--set"):
        load_config(None, [override])


def test_cli_bad_value_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tokens"
    status = main(["data", "--input", "stdlib:python/json", "--seq-len", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.count("\n") == 0
    assert "data.seq_len=1" in err and "greater than or equal to 2" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_every_cli_target_resolves() -> None:
    """Each subcommand names a real function, and the stage rows follow the one list of names."""
    import importlib

    from kdscale import cli
    from kdscale.recipe.stages import STAGES as RECIPE_TABLE
    from kdscale.stages import RECIPE_STAGES, STAGE_COMMANDS

    assert tuple(cli.STAGES) == STAGE_COMMANDS
    assert tuple(RECIPE_TABLE) == RECIPE_STAGES
    targets = [stage.target for stage in cli.STAGES.values()]
    targets += [target for _, target in cli.COMMANDS.values()]
    for target in targets:
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
