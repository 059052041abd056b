"""The quickstart's first 8 training losses against the recorded curve (fp32, CPU, to 1e-5).

``configs/quickstart.yaml`` runs as shipped — data, teacher import, top-64 cache of SmolLM2-135M,
pruning, distillation — except where it writes, how often it logs (every step; no evaluation,
no W&B) and that training stops after step 8 (``train.exit_interval``: the LR and α schedules
still span the quickstart's 24 steps). A change anywhere upstream of the loss — tokenizer,
packing, import, pruning, codec, model, loss, optimizer, data order — moves these numbers; a
deliberate one re-records ``tests/assets/quickstart_losses.json`` with this test's command.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers_train import assert_close, metrics

from kdscale.cli import main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "assets" / "quickstart_losses.json"


def test_quickstart_first_8_losses_match_the_golden_curve(tmp_path: Path) -> None:
    status = main([
        "run", str(REPO / "configs" / "quickstart.yaml"),
        "--set", f"recipe.out={tmp_path / 'quickstart'}",
        "--set", "recipe.stages=[data,teacher,cache,prune,train]",
        "--set", "train.exit_interval=8", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "wandb.enabled=false",
    ])  # fmt: skip
    assert status == 0
    want = {int(step): loss for step, loss in json.loads(GOLDEN.read_text())["loss/total"].items()}
    got = metrics(tmp_path / "quickstart" / "student", "loss/total")
    assert_close(got, want, range(1, 9), rtol=1e-5)
