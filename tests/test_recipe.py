"""`kdscale run`: a whole prune → cache → distill recipe on real parts, run, stopped, resumed,
skipped, changed; its W&B lineage; and `--dry-run` of every recipe in configs/.

The module's recipe (a tiny random Llama teacher with SmolLM2's tokenizer) runs once, stopped
after two training steps by ``train.exit_interval`` and then completed by the same command; the
tests below read what those two invocations did. The last test changes the config and so must
stay last.
"""

from __future__ import annotations

import json
import os
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import yaml
from helpers_wandb import read_runs

from kdscale.cli import main
from kdscale.config import load_config

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = ["data", "teacher", "cache", "prune", "train", "baseline", "export", "report"]


def _recipe(tmp: Path, teacher_dir: str | Path, **recipe: object) -> Path:
    tree = {
        "recipe": {"name": "tiny", "out": str(tmp / "run"), "teacher": str(teacher_dir),
                   "stages": ALL_STAGES, **recipe},
        "data": {"inputs": ["stdlib:python/json/encoder.py"],
                 "eval_inputs": ["stdlib:python/textwrap.py"], "seq_len": 32, "shard_samples": 64},
        "prune": {"calibration_samples": 8, "target": {"num_layers": 1, "ffn_hidden_size": 32}},
        "cache": {"codec": {"kind": "topk", "k": 8}, "ray": {"actors": 1, "num_cpus": 2}},
        "wandb": {"mode": "offline"},
        "train": {"steps": 3, "global_batch": 4, "micro_batch": 2, "eval_every": 1,
                  "eval_batches": 2, "save_every": 0, "log_every": 1,
                  "lr": {"lr": 1e-3, "min_lr": 1e-4}},
    }  # fmt: skip
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["run", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _plan(out: str) -> dict[str, str]:
    """``stage -> action`` from the plan lines a run prints first."""
    plan = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ALL_STAGES and parts[0] in (
            "skip", "run", "resume", "redo", "refuse"
        ):
            plan[parts[1]] = parts[0]
    return plan


def _state(root: Path, stage: str) -> dict:
    return json.loads((root / ".kdscale-run" / f"{stage}.json").read_text())


# --- planning only ---------------------------------------------------------------------------------


def test_dry_run_prints_every_stage_and_writes_nothing(tmp_path, capsys):
    status, out, _ = _run(capsys, str(_recipe(tmp_path, "smollm2-135m")), "--dry-run")
    assert status == 0
    assert _plan(out) == dict.fromkeys(ALL_STAGES, "run")
    assert f"{tmp_path / 'run' / 'cache'}" in out and f"{tmp_path / 'run' / 'pruned'}" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"stages": ["cache", "data"]}, "stages must be distinct and in the order"),
        ({"stages": ["data", "teacher"], "teacher": ""}, "set recipe.teacher"),
        ({"out": ""}, "recipe.out is empty"),
        ({"stages": ["data", "compile"]}, "recipe.stages.1='compile'"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, capsys, recipe, message):
    status, out, err = _run(capsys, str(_recipe(tmp_path, "smollm2-135m", **recipe)), "--dry-run")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kdscale run: error: ") and message in err


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.global_batch=250"], "train.global_batch=250 is not a multiple of train.micro_batch"),
        (["loss.divergence=jsd"], "loss.divergence='jsd', loss.missing_mass='zero' on 'sampled'"),
    ],
)
def test_dry_run_checks_training_against_layout_and_cache(tmp_path, capsys, sets, message):
    recipe = REPO / "configs" / "llama31-8b-to-4b-minitron-width.yaml"
    argv = [str(recipe), "--dry-run", "--set", f"recipe.out={tmp_path}"]
    status, out, err = _run(capsys, *argv, *[a for s in sets for a in ("--set", s)])
    assert status == 2 and out == "" and message in err


@pytest.mark.parametrize(
    ("sets", "warning"),
    [
        ([], None),  # the recipe wires the pruned model in: nothing to say
        (["train.init=elsewhere"], "but the student starts from elsewhere (train.init); set "
                                   "train.init={pruned} to distill the pruned model"),
        (["train.engine=deepspeed", "train.deepspeed.model=smollm2-135m",
          "recipe.stages=[data,teacher,cache,prune,train]"],
         "but the student starts from smollm2-135m (train.deepspeed.model)"),
    ],
)  # fmt: skip
def test_recipe_warns_when_the_student_does_not_start_from_the_pruned_model(
    tmp_path, capsys, sets, warning
):
    argv = [str(_recipe(tmp_path, "smollm2-135m")), "--dry-run"]
    status, _, err = _run(capsys, *argv, *[a for s in sets for a in ("--set", s)])
    assert status == 0, err
    if warning is None:
        assert "pruned model" not in err
    else:
        pruned = tmp_path / "run" / "pruned"
        assert f"a pruned model exists at {pruned}, {warning.format(pruned=pruned)}" in err


def _recipes() -> list[Path]:
    return [p for p in sorted((REPO / "configs").glob("*.yaml")) if "recipe" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.name)
def test_every_recipe_in_configs_passes_dry_run(tmp_path, capsys, path):
    """Real-scale recipes (teachers that are not on this machine) still plan and validate."""
    status, out, err = _run(capsys, str(path), "--dry-run", "--set", f"recipe.out={tmp_path / 'r'}")
    assert status == 0, err
    stages = load_config([str(path)]).recipe.stages  # with its base files
    assert _plan(out) == dict.fromkeys(stages, "run")


# --- one real recipe run, stopped and resumed ------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_run(module_tmp_path, tiny_teacher_dir):
    """Run the tiny recipe twice: stopped by exit_interval during train, then to the end."""
    tmp = module_tmp_path
    recipe = _recipe(tmp, tiny_teacher_dir)
    outputs = []
    for extra in (["--set", "train.exit_interval=2"], []):
        buffer = StringIO()  # module fixtures cannot use capsys
        with redirect_stdout(buffer):
            status = main(["run", str(recipe), *extra])
        outputs.append((status, buffer.getvalue(), sorted(p.name for p in (tmp / "run").iterdir())))
    return recipe, tmp / "run", outputs


def test_a_stopped_stage_resumes_and_the_later_stages_run(recipe_run):
    _, root, ((first, out1, made1), (second, out2, _)) = recipe_run
    assert (first, second) == (0, 0)
    assert _plan(out1) == dict.fromkeys(ALL_STAGES, "run")
    assert "stage train stopped before it finished" in out1
    assert "baseline" not in made1 and "student" in made1  # nothing after the stopped stage ran
    assert _plan(out2) == {"data": "skip", "teacher": "skip", "prune": "skip", "cache": "skip",
                           "train": "resume", "baseline": "run", "export": "run", "report": "run"}
    steps = [json.loads(line)["step"] for line in (root / "student" / "metrics.jsonl").read_text().splitlines()
             if "loss/total" in line]  # fmt: skip
    assert steps == [1, 2, 3]  # steps 1-2 in the first invocation, 3 after resuming
    assert all(_state(root, s)["status"] == "complete" for s in ALL_STAGES)
    assert "all 8 stages complete" in out2


def test_stage_outputs_and_records(recipe_run):
    _, root, _ = recipe_run
    assert (root / "tokens" / "manifest.json").is_file() and (root / "cache" / "manifest.json").is_file()
    pruned = yaml.safe_load((root / "pruned" / "model.yaml").read_text())
    assert (pruned["num_layers"], pruned["ffn_hidden_size"]) == (1, 32)
    student = yaml.safe_load((root / "student" / "checkpoints" / "step_000000003" / "model.yaml").read_text())
    assert (student["num_layers"], student["ffn_hidden_size"]) == (1, 32)  # the pruned shape
    ran = yaml.safe_load((root / ".kdscale-run" / "train.yaml").read_text())
    assert ran["train"]["init"] == str(root / "pruned") and ran["train"]["cache"] == str(root / "cache")
    baseline = yaml.safe_load((root / ".kdscale-run" / "baseline.yaml").read_text())
    assert baseline["train"]["init"] == str(root / "pruned") and baseline["train"]["cache"] is None


def test_report_compares_teacher_pruned_distilled_and_lm_only(recipe_run, capsys):
    _, root, (_, (_, out2, _)) = recipe_run
    rows = json.loads((root / "report" / "report.json").read_text())["rows"]
    labels = [r["model"] for r in rows]
    assert labels == ["teacher", "pruned, before distillation", "distilled student",
                      "student, LM loss only (no KD)"]
    teacher, pruned, student, baseline = rows
    assert pruned["parameters"] == student["parameters"] == baseline["parameters"] < teacher["parameters"]
    assert (pruned["step"], student["step"], baseline["step"]) == (0, 3, 3)
    assert len({r["lm_loss"] for r in rows}) == 4  # four different models, one eval set
    assert all(r["tokens"] == teacher["tokens"] > 0 for r in rows)
    assert "| distilled student |" in out2  # the table is printed
    assert (root / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_writes_a_loadable_hf_student(recipe_run):
    from transformers import AutoConfig, AutoTokenizer

    _, root, _ = recipe_run
    config = AutoConfig.from_pretrained(root / "hf")
    assert (config.num_hidden_layers, config.intermediate_size) == (1, 32)
    assert AutoTokenizer.from_pretrained(root / "hf").vocab_size > 0


def test_wandb_has_one_group_a_run_per_stage_and_lineage(recipe_run):
    _, root, _ = recipe_run
    runs = read_runs(root / "wandb")
    group = json.loads((root / ".kdscale-run" / "group.json").read_text())["group"]
    assert {r["group"] for r in runs} == {group} and group.startswith("tiny-")
    job_types = [r["job_type"] for r in runs]
    assert sorted(job_types) == sorted(ALL_STAGES + ["train"])  # train ran in two invocations
    produced = {a["name"]: a for r in runs for a in r["artifacts"]}
    assert set(produced) == {f"tiny-{s}" for s in ALL_STAGES}
    assert "manifest.json" in produced["tiny-cache"]["files"]
    assert "importance.json" in produced["tiny-prune"]["files"]
    finished_train = [r for r in runs if r["job_type"] == "train" and r["artifacts"]]
    assert len(finished_train) == 1
    inputs = json.loads(finished_train[0]["config"]["lineage"])["inputs"]
    assert set(inputs) == {"tiny-data", "tiny-cache", "tiny-prune"}
    assert inputs["tiny-cache"]["directory"] == str(root / "cache")
    # the train stage's own metrics went into the stage's run, not into a second one
    assert "digest" in finished_train[0]["config"] and "inputs" in finished_train[0]["config"]


def test_rerun_skips_every_stage_and_touches_nothing(recipe_run, capsys):
    recipe, root, _ = recipe_run
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "wandb" not in p.parts}
    status, out, _ = _run(capsys, str(recipe))
    assert status == 0 and _plan(out) == dict.fromkeys(ALL_STAGES, "skip")
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "wandb" not in p.parts}
    assert after == before


def test_an_existing_pruned_model_the_student_skips_is_warned(recipe_run, tmp_path, capsys):
    _, root, _ = recipe_run  # a train-only recipe next to the pruned model of the run above
    argv = ["--set", f"recipe.out={tmp_path}", "--set", "recipe.stages=[train]",
            "--set", f"data.out={root / 'tokens'}", "--set", f"prune.out={root / 'pruned'}"]
    status, _, err = _run(capsys, str(recipe_run[0]), "--dry-run", *argv)
    assert status == 0, err
    assert (
        f"a pruned model exists at {root / 'pruned'}, but the student starts from a random init "
        f"(train.init); set train.init={root / 'pruned'}"
    ) in err


def test_verify_refuses_a_stage_whose_output_was_damaged_since(recipe_run, capsys):
    """`--verify`: a rerun skips a stage only if its output still verifies."""
    recipe, root, _ = recipe_run
    status, out, _ = _run(capsys, str(recipe), "--verify", "--dry-run")
    assert status == 0 and _plan(out) == dict.fromkeys(ALL_STAGES, "skip")
    assert out.count("complete, config unchanged, verified") == len(ALL_STAGES)
    shard = sorted((root / "cache").glob("train-*.tar"))[0]
    weights = sorted((root / "student" / "checkpoints" / "step_000000003").glob("*.distcp"))[0]
    originals = {path: path.read_bytes() for path in (shard, weights)}
    try:
        for path, blob in originals.items():
            path.write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
        status, out, _ = _run(capsys, str(recipe), "--dry-run")
        assert status == 0 and _plan(out) == dict.fromkeys(ALL_STAGES, "skip")  # trusted blindly
        status, out, err = _run(capsys, str(recipe), "--verify", "--dry-run")
        assert status == 2
        assert {s: a for s, a in _plan(out).items() if a != "skip"} == {
            "cache": "refuse", "train": "refuse"}
        assert err.count("\n") == 1 and shard.name in err and "damaged since it completed" in err
        assert "--force" in err
    finally:
        for path, blob in originals.items():
            path.write_bytes(blob)


def test_changed_config_refuses_then_force_reruns_that_stage_and_later(recipe_run, capsys):
    """Keep this test last: it changes the module's recipe run."""
    recipe, root, _ = recipe_run
    status, out, err = _run(capsys, str(recipe), "--set", "train.steps=4")
    assert status == 2
    assert _plan(out) == {"data": "skip", "teacher": "skip", "prune": "skip", "cache": "skip",
                          "train": "refuse", "baseline": "refuse", "export": "refuse",
                          "report": "refuse"}
    assert "changed: train.steps" in out and "pass --force" in err
    assert _state(root, "train")["decisive"]["train"]["steps"] == 3  # nothing ran
    cache_manifest = (root / "cache" / "manifest.json").stat().st_mtime_ns
    status, out, _ = _run(capsys, str(recipe), "--set", "train.steps=4", "--force")
    assert status == 0
    assert _plan(out) == {"data": "skip", "teacher": "skip", "prune": "skip", "cache": "skip",
                          "train": "redo", "baseline": "redo", "export": "redo", "report": "redo"}
    assert (root / "cache" / "manifest.json").stat().st_mtime_ns == cache_manifest
    rows = json.loads((root / "report" / "report.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 0, 4, 4]
    assert os.path.isdir(root / "student" / "checkpoints" / "step_000000004")


def test_deepspeed_engine_starts_from_the_pruned_model(tmp_path, capsys):
    from kdscale.recipe.plan import wire

    recipe = _recipe(tmp_path, "smollm2-135m", stages=["data", "teacher", "cache", "prune", "train"])
    cfg = wire(load_config([str(recipe)], ["train.engine=deepspeed"]))
    assert cfg.train.deepspeed.model == str(tmp_path / "run" / "pruned") and cfg.train.init is None
    status, _, err = _run(capsys, str(_recipe(tmp_path, "smollm2-135m")), "--dry-run",
                          "--set", "train.engine=deepspeed")
    assert status == 2 and "'export' and 'report' read megatron checkpoints" in err


def test_prune_search_in_a_recipe_hands_the_winner_to_train(
    tmp_path, capsys, tiny_teacher_dir, tiny_tokens_dir, tiny_cache_dir
):
    from kdscale.models import count_parameters
    from kdscale.models.hf_convert import hf_config_to_model

    teacher = hf_config_to_model(json.loads((tiny_teacher_dir / "config.json").read_text()))
    recipe = _recipe(tmp_path, tiny_teacher_dir, stages=["teacher", "prune", "train"])
    sets = {"data.out": tiny_tokens_dir, "train.cache": tiny_cache_dir, "train.steps": 2,
            "prune.search.enabled": True, "prune.search.params": count_parameters(teacher) - 5000,
            "prune.search.width_step": 8, "prune.search.top_k": 2, "prune.search.steps": 2,
            "wandb.enabled": False}  # fmt: skip
    argv = [str(recipe)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    status, out, err = _run(capsys, *argv)
    assert status == 0, err
    root = tmp_path / "run"
    winner = json.loads((root / "pruned" / "search.json").read_text())["winner"]
    ran = yaml.safe_load((root / ".kdscale-run" / "train.yaml").read_text())
    assert ran["train"]["init"] == str(root / "pruned" / "candidates" / winner / "model")
    assert ran["model"]["hidden_size"] == 24  # the winner's shape, not the model section's
    status, out, _ = _run(capsys, *argv)
    assert status == 0 and _plan(out) == dict.fromkeys(["teacher", "prune", "train"], "skip")
