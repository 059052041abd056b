"""`kdscale train` with ``train.engine=deepspeed``: DeepSpeed ZeRO on CPU (gloo), real parts.

The student is a tiny random transformers Llama saved as an HF directory; data and a real
Ray-made cache come from the conftest fixtures. One reference run (1 rank, ZeRO-3, fp32) trains
STEPS steps with cached-target KD. Then:

- ZeRO-3 on 2 ranks (same global batch, other micro-batch split) reproduces its losses and
  gradient norms; it is stopped by ``train.exit_interval`` after step 3 and rerun, and the
  resumed steps must also match (ZeRO-3 partitions parameters, gradients and Adam state, and
  DeepSpeed reloads each rank's partition).
- A ZeRO-1 run (`kdscale train` in a subprocess) sent SIGTERM saves, exits 0, and the rerun
  completes the reference curve.
- The megatron engine, started from the same weights (``import-hf`` of the same directory),
  with the same data, loss and schedule, gives the same losses: both engines compute the same
  objective.
- A run started from that kdscale model directory starts from the same weights.
- A bf16 ZeRO-2 run stopped by ``train.exit_interval`` and rerun repeats its straight twin
  exactly (the fp32 master weights and Adam state are restored).
- The exported ``out/hf`` loads with transformers and gives the engine's eval loss.

Tolerances. DP=2 differs from DP=1 only in the order of floating-point sums (micro-batch
split, gloo reduce-scatter): measured, losses agree to 1e-7 relative and gradient norms to 6e-8;
compared at 1e-5 and 5e-5 as in tests/test_train.py (a wrong shard, a skipped sample, a lost
optimizer state or a misplaced LR step moves losses by > 1e-3). Megatron and transformers run
different modules (fused QKV, SDPA vs megatron's attention) over the same fp32 weights:
measured, the losses of all 6 steps agree bit for bit; compared at 1e-6. Gradient norms differ
by 1.1-1.6e-5 relative: DeepSpeed's matches an fp64 recomputation of the step-1 gradient to
5e-8, megatron's is 1.1e-5 low (its own layouts differ by up to 8e-6, see tests/test_train.py);
compared at 5e-5. Adam's update is nearly scale-free, so such a norm difference does not move
the losses.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from kdscale.cli import main
from kdscale.config import load_config
from kdscale.models.checkpoints import latest_checkpoint, read_train_state, step_name
from kdscale.train.stage import run
from tests.dist import run_distributed
from tests.helpers_train import assert_close, metrics, overrides, stop_then_rerun

STEPS = 6
TRAIN = {
    "train.engine": "deepspeed", "train.deepspeed.zero_stage": 3, "train.steps": STEPS,
    "train.global_batch": 4, "train.micro_batch": 2, "train.log_every": 1,
    "train.save_every": 3, "train.lr.lr": 3e-3, "train.lr.min_lr": 3e-4,
    "train.lr.warmup_steps": 1, "train.eval_every": STEPS, "train.eval_batches": 2,
    "wandb.enabled": False,
}  # fmt: skip


def make_student(out: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama (GQA, tied embeddings) with the fixture's tokenizer, as HF saves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def config(tokens: Path, cache: Path, out: Path, extra: dict[str, Any] | None = None):
    values = TRAIN | {"train.tokens": str(tokens), "train.cache": str(cache), "train.out": str(out)}
    return load_config(None, overrides(values | (extra or {})))


def _one_rank(rank: int, world_size: int, tokens: Path, cache: Path, root: Path) -> None:
    from kdscale.models.hf_io import import_hf

    start = {"train.deepspeed.model": str(root / "student")}
    run(config(tokens, cache, root / "ref", start))
    unfused = {"loss.fused_head": False, "train.save_every": 0, "train.deepspeed.export_hf": False}
    run(config(tokens, cache, root / "unfused", start | unfused))
    model = import_hf(root / "student", root / "student_mg")
    megatron = {f"model.{k}": v for k, v in model.model_dump(mode="json").items()} | {
        "train.engine": "megatron", "train.init": str(root / "student_mg"),
    }  # fmt: skip
    run(config(tokens, cache, root / "megatron", megatron))
    short = {"train.save_every": 0, "train.eval_every": 0, "train.deepspeed.export_hf": False}
    from_dir = short | {"train.deepspeed.model": str(root / "student_mg"), "train.steps": 2}
    run(config(tokens, cache, root / "from_model_dir", from_dir))
    bf16 = start | short | {"model.precision": "bf16", "train.deepspeed.zero_stage": 2,
                            "train.steps": 3}  # fmt: skip
    run(config(tokens, cache, root / "bf16", bf16))
    run(config(tokens, cache, root / "bf16_resumed", bf16 | {"train.exit_interval": 2}))
    run(config(tokens, cache, root / "bf16_resumed", bf16))  # the same command again


def _two_ranks(rank: int, world_size: int, tokens: Path, cache: Path, root: Path) -> None:
    dp2 = {"train.deepspeed.model": str(root / "student"), "train.micro_batch": 1}
    run(config(tokens, cache, root / "dp2", dp2 | {"train.exit_interval": 3}))
    run(config(tokens, cache, root / "dp2", dp2))  # the same command again: resumes at step 3


@pytest.fixture(scope="module")
def runs(
    module_tmp_path: Path,
    tiny_tokens_dir: Path,
    tiny_cache_dir: Path,
    smollm2_dir: Path,
) -> Path:
    root = module_tmp_path
    make_student(root / "student", smollm2_dir)
    run_distributed(_one_rank, world_size=1, args=(tiny_tokens_dir, tiny_cache_dir, root))
    run_distributed(_two_ranks, world_size=2, args=(tiny_tokens_dir, tiny_cache_dir, root))
    return root


def test_reference_run_trains_saves_and_exports(runs: Path) -> None:
    losses = metrics(runs / "ref", "loss/total")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.2
    lrs = metrics(runs / "ref", "optim/lr")  # megatron's schedule: warmup 1 step, cosine
    assert lrs[1] == pytest.approx(3e-3) and lrs[STEPS] == pytest.approx(3e-4)
    saved = sorted(p.name for p in (runs / "ref" / "checkpoints").glob("step_*"))
    assert saved == [step_name(3), step_name(STEPS)]
    state = read_train_state(latest_checkpoint(runs / "ref"))
    assert state["engine"] == "deepspeed" and state["zero_stage"] == 3
    assert state["consumed_samples"] == 4 * STEPS and state["cache"]["teacher_fingerprint"]
    assert (runs / "ref" / "hf" / "model.safetensors").is_file()


def test_zero3_two_ranks_reproduce_one_rank_and_resume(runs: Path) -> None:
    for key, rtol in (("loss/total", 1e-5), ("optim/grad_norm", 5e-5)):
        got, want = metrics(runs / "dp2", key), metrics(runs / "ref", key)
        assert_close(got, want, range(1, STEPS + 1), rtol)  # 1-3 straight, 4-6 resumed
    lines = [json.loads(x) for x in (runs / "dp2" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss/total" in x] == list(range(1, STEPS + 1))
    assert read_train_state(latest_checkpoint(runs / "dp2"))["world_size"] == 2


def test_fused_lm_head_reproduces_lm_head_then_loss_under_zero3(runs: Path) -> None:
    # The LossHead runs the loss inside lm_head's forward, where ZeRO-3 gathers its weight.
    for key, rtol in (("loss/total", 1e-5), ("kd/kl_teacher_tail", 1e-5), ("eval/lm_loss", 1e-5),
                      ("eval/kd_loss", 1e-5), ("optim/grad_norm", 5e-5)):  # fmt: skip
        got, want = metrics(runs / "unfused", key), metrics(runs / "ref", key)
        assert_close(got, want, sorted(want), rtol)


def test_megatron_and_deepspeed_engines_compute_the_same_objective(runs: Path) -> None:
    steps = range(1, STEPS + 1)
    for key, rtol in (("loss/total", 1e-6), ("loss/lm", 1e-6), ("kd/kl_teacher_tail", 1e-6),
                      ("optim/lr", 1e-12), ("optim/grad_norm", 5e-5)):  # fmt: skip
        assert_close(metrics(runs / "megatron", key), metrics(runs / "ref", key), steps, rtol)


def test_kdscale_model_dir_starts_from_the_same_weights(runs: Path) -> None:
    # import-hf → megatron checkpoint → back to transformers: the first loss is the HF start's.
    got, want = metrics(runs / "from_model_dir", "loss/total"), metrics(runs / "ref", "loss/total")
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    assert not (runs / "from_model_dir" / "hf").exists()  # train.deepspeed.export_hf=false


def test_bf16_run_stopped_and_resumed_repeats_the_straight_run(runs: Path) -> None:
    straight = metrics(runs / "bf16", "loss/total")
    resumed = metrics(runs / "bf16_resumed", "loss/total")
    assert sorted(resumed) == [1, 2, 3]
    assert resumed == straight  # same bf16 math; fp32 master weights and Adam state restored
    assert straight[1] != metrics(runs / "ref", "loss/total")[1]  # it did compute in bf16


def test_exported_hf_dir_gives_the_engines_eval_loss(runs: Path, tiny_tokens_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdscale.data.manifest import load_tokens_manifest
    from kdscale.data.store import TokenStore

    model = AutoModelForCausalLM.from_pretrained(runs / "ref" / "hf", dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(runs / "ref" / "hf").vocab_size == 49152
    store = TokenStore(tiny_tokens_dir, load_tokens_manifest(tiny_tokens_dir), "eval")
    tokens = torch.stack([torch.from_numpy(store.tokens(i).astype("int64")) for i in range(8)])
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    evaluated = metrics(runs / "ref", "eval/lm_loss")  # 2 eval batches of 4 = the same 8 samples
    assert lm.item() == pytest.approx(evaluated[STEPS], rel=1e-5)


@pytest.mark.parametrize(
    ("sig", "save_every", "first_save"),
    [(signal.SIGTERM, 0, 1), (signal.SIGKILL, 2, 2)],
    ids=["sigterm-saves-on-the-signal", "sigkill-after-a-save"],
)
def test_stopped_run_resumes_the_same_curve(
    runs: Path, tiny_tokens_dir: Path, tiny_cache_dir: Path, sig: int, save_every: int,
    first_save: int,
) -> None:
    """SIGTERM: the run saves and exits 0. SIGKILL: it dies at once, and the rerun starts from
    the last complete checkpoint. Either way the rerun completes the reference curve (steps
    logged twice keep the rerun's value; ZeRO-1 computes what ZeRO-3 does)."""
    out = runs / signal.Signals(sig).name.lower()
    values = TRAIN | {
        "train.tokens": str(tiny_tokens_dir), "train.cache": str(tiny_cache_dir),
        "train.out": str(out), "train.deepspeed.model": str(runs / "student"),
        "train.deepspeed.zero_stage": 1, "train.save_every": save_every, "train.eval_every": 0,
    }  # fmt: skip
    assert first_save <= stop_then_rerun(values, out, sig) < STEPS
    assert read_train_state(latest_checkpoint(out))["step"] == STEPS
    steps = range(1, STEPS + 1)
    assert_close(metrics(out, "loss/total"), metrics(runs / "ref", "loss/total"), steps)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["train.deepspeed.zero_stage=4"], "train.deepspeed.zero_stage=4: Input should be 1, 2"),
        (["parallel.tensor=2"], "train.engine=deepspeed is data parallel only: parallel.tensor=2"),
        (["model.precision=fp8"], "model.precision='fp8' with train.engine=deepspeed"),
        (["train.init=somewhere"], "train.init='somewhere' with train.engine=deepspeed"),
        (["train.deepspeed.model=no/such/dir"], "train.deepspeed.model='no/such/dir': not a"),
    ],
)
def test_bad_config_is_one_line_error(
    setting: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--out", str(tmp_path / "run"), "--set", "train.engine=deepspeed"]
    assert main(args + sum((["--set", s] for s in setting), [])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_resume_refuses_another_world_size(
    runs: Path, tiny_tokens_dir: Path, tiny_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = {"train.deepspeed.model": str(runs / "student"), "train.nproc_per_node": 2,
           "train.micro_batch": 1, "train.steps": STEPS + 2}  # fmt: skip
    args = ["train"] + sum((["--set", s] for s in overrides(
        TRAIN | cfg | {"train.tokens": str(tiny_tokens_dir), "train.cache": str(tiny_cache_dir),
                       "train.out": str(runs / "ref")})), [])  # fmt: skip
    assert main(args) == 2
    assert "was saved with world_size=1, this one has 2" in capsys.readouterr().err


def test_megatron_side_commands_refuse_a_deepspeed_run(
    runs: Path, tiny_tokens_dir: Path, tiny_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """eval / export-hf / train.init read megatron weights: a DeepSpeed run points to its hf/."""
    assert main(["eval", str(runs / "ref"), "--data", str(tiny_tokens_dir)]) == 2
    assert "was trained with train.engine=deepspeed" in capsys.readouterr().err
    assert main(["export-hf", str(runs / "ref"), str(runs / "nowhere")]) == 2
    assert "use the Hugging Face directory the run exported" in capsys.readouterr().err
    resume = overrides(TRAIN | {"train.tokens": str(tiny_tokens_dir), "train.out": str(runs / "ref"),
                                "train.cache": str(tiny_cache_dir), "train.engine": "megatron",
                                "model.vocab_size": 49152})
    assert main(["train"] + sum((["--set", s] for s in resume), [])) == 2
    err = capsys.readouterr().err
    assert "holds a train.engine=deepspeed run; train.engine=megatron cannot resume it" in err
    assert not (runs / "nowhere").exists()


def test_a_damaged_zero_checkpoint_is_refused_before_deepspeed_loads_it(
    runs: Path, tmp_path: Path, tiny_tokens_dir: Path, tiny_cache_dir: Path
) -> None:
    """DeepSpeed unpickles its own files: a resume verifies checksums.json first (one line)."""
    import subprocess
    import sys

    out = tmp_path / "ref"
    shutil.copytree(runs / "ref", out)
    target = sorted(latest_checkpoint(out).glob("*model_states.pt"))[0]
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    values = TRAIN | {"train.deepspeed.model": str(runs / "student"), "train.steps": STEPS + 1,
                      "train.tokens": str(tiny_tokens_dir), "train.cache": str(tiny_cache_dir),
                      "train.out": str(out)}  # fmt: skip
    command = [sys.executable, "-m", "kdscale.cli", "train"]
    for item in overrides(values):
        command += ["--set", item]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and f"{target.name} is corrupt" in errors[0]
    assert read_train_state(latest_checkpoint(out))["step"] == STEPS  # nothing resumed or saved
