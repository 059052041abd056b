"""Stage outputs as W&B artifacts: which small files describe each output directory.

The manifests, configs and reports are stored in the artifact; the directory itself (shards,
checkpoints, weights) is referenced, not uploaded. The stage that writes an output logs its
artifact; the stages that read it build the same artifact and record it as an input.
"""

from __future__ import annotations

from pathlib import Path

from kdscale.config import KDScaleConfig
from kdscale.recipe.stages import STAGES
from kdscale.tracking import ArtifactSpec

# stage -> (artifact type, files describing its output, relative to the output directory)
_DESCRIBED_BY: dict[str, tuple[str, tuple[str, ...]]] = {
    "data": ("tokens", ("manifest.json", "config.yaml")),
    "teacher": ("model", ("model.yaml", "train_state.json")),
    "prune": ("model", ("model.yaml", "train_state.json", "importance.json", "importance.png",
                        "search.json", "search.md")),
    "cache": ("teacher-cache", ("manifest.json", "config.yaml")),
    "train": ("student", ("config.yaml", "metrics.jsonl")),
    "baseline": ("student", ("config.yaml", "metrics.jsonl")),
    "export": ("hf-model", ("config.json",)),
    "report": ("report", ("report.json", "report.md", "curves.png")),
}


def stage_artifact(cfg: KDScaleConfig, stage: str) -> ArtifactSpec:
    """The artifact of ``stage``'s output in this recipe run (named ``<recipe>-<stage>``)."""
    kind, names = _DESCRIBED_BY[stage]
    directory = Path(STAGES[stage].output(cfg))
    files = [directory / name for name in names]
    metadata: dict[str, str] = {"stage": stage, "recipe": cfg.recipe.name}
    if stage in ("train", "baseline"):
        from kdscale.models.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(directory)
        if ckpt is not None:
            files.append(ckpt / "train_state.json")
            metadata["checkpoint"] = ckpt.name
    name = f"{cfg.recipe.name or 'recipe'}-{stage}"
    return ArtifactSpec(name, kind, directory, tuple(p for p in files if p.is_file()), metadata)
