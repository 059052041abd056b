"""Weighted blends of token sets (``train.sources``): the order of global batches, the checks,
and a blended recipe trained for real.

The order must give every global batch each source's share within one sample of its weight, walk
each source through its own per-epoch permutations (a small source starts its next epoch while
the others continue), and be reproduced exactly from the per-source counts a checkpoint
records, even with another global batch; data-parallel ranks split each batch. Bad blends —
a weight ≤ 0, sources of different tokenizers or vocabularies, a cache of other tokens, an
incomplete token set, caches on some sources only — are one-line errors before any work.

A recipe with two sources tokenizes and caches each once (a changed weight re-runs training
only), trains a megatron student on the 3:1 blend with held-out loss and KL per source, and the
same blend at DP=2, stopped after step 3 and resumed, repeats the single-rank losses (to 1e-5,
as in ``test_train.py``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers_train import TINY_TRAIN_SETS, assert_close, metrics

from kdscale.cli import main
from kdscale.data.manifest import TokensManifest, load_tokens_manifest
from kdscale.data.store import TokenStore
from kdscale.models.checkpoints import latest_checkpoint, read_train_state
from kdscale.train.loader import Needs, TrainLoader
from kdscale.train.sources import BlendOrder, BlendStore
from tests.dist import run_distributed

SIZES, WEIGHTS = [40, 13, 7], [0.5, 0.3, 0.2]


def _source_of(order: BlendOrder, indices: np.ndarray) -> np.ndarray:
    return np.searchsorted(order.offsets, indices, side="right") - 1


@pytest.mark.parametrize("global_batch", [8, 10, 7])
def test_every_batch_takes_each_source_by_weight(global_batch: int) -> None:
    order = BlendOrder(SIZES, WEIGHTS, seed=5)
    totals = np.zeros(3, np.int64)
    for step in range(120):
        batch = order.batch(step * global_batch, global_batch)
        counts = np.bincount(_source_of(order, batch), minlength=3)
        assert counts.sum() == global_batch
        for count, weight in zip(counts, WEIGHTS):
            assert abs(count - Fraction(str(weight)) * global_batch) <= 1
        totals += counts
        for total, weight in zip(totals, WEIGHTS):  # and over the run so far
            assert abs(total - Fraction(str(weight)) * (step + 1) * global_batch) < 1.5


def test_a_source_that_runs_out_starts_its_next_epoch() -> None:
    order = BlendOrder(SIZES, WEIGHTS, seed=5)
    drawn = [order.batch(step * 10, 10) for step in range(60)]  # 600 samples: ~17 epochs of 7
    local = {k: [] for k in range(3)}
    for batch in drawn:
        for k, i in zip(_source_of(order, batch), batch):
            local[int(k)].append(int(i - order.offsets[k]))
    for k, size in enumerate(SIZES):
        seen = local[k]
        assert Counter(seen[: size * (len(seen) // size)]) == Counter(
            {i: len(seen) // size for i in range(size)}
        )  # every full epoch visits every sample once
        epochs = [seen[e * size : (e + 1) * size] for e in range(len(seen) // size)]
        assert len({tuple(e) for e in epochs}) == len(epochs)  # a new permutation each epoch
    assert drawn[3].tolist() == BlendOrder(SIZES, WEIGHTS, seed=5).batch(30, 10).tolist()
    assert drawn[3].tolist() != BlendOrder(SIZES, WEIGHTS, seed=6).batch(30, 10).tolist()


def test_resume_from_per_source_counts_is_exact_even_with_another_batch() -> None:
    straight = BlendOrder(SIZES, WEIGHTS, seed=5)
    batches = [straight.batch(step * 8, 8) for step in range(12)]
    counts = straight.counts(6 * 8, 8)  # what the checkpoint of step 6 records
    resumed = BlendOrder(SIZES, WEIGHTS, seed=5, consumed=counts)
    assert all(np.array_equal(resumed.batch(step * 8, 8), batches[step]) for step in range(6, 12))
    bigger = BlendOrder(SIZES, WEIGHTS, seed=5, consumed=counts)
    first = bigger.batch(48, 16)
    assert len(first) == 16 and bigger.counts(64, 16) == [c + q for c, q in
                                                          zip(counts, bigger.quotas(counts, 16))]  # fmt: skip


def test_data_parallel_ranks_split_each_blended_batch(tiny_tokens_dir: Path) -> None:
    tokens = load_tokens_manifest(tiny_tokens_dir)
    store = BlendStore([TokenStore(tiny_tokens_dir, tokens, "train"), TokenStore(tiny_tokens_dir, tokens, "eval")])
    order = BlendOrder([len(s) for s in store.stores], [3, 1], seed=1)

    def steps(rank: int, size: int) -> list[torch.Tensor]:
        loader = TrainLoader(store, order, consumed_samples=0, global_batch=8, micro_batch=2, dp_rank=rank,
                             dp_size=size, needs=Needs(tokens=True, targets=False), prefetch=2)  # fmt: skip
        try:
            return [torch.cat([mb.tokens for mb in loader.next_step()]) for _ in range(4)]
        finally:
            loader.close()

    whole, halves = steps(0, 1), [steps(r, 2) for r in range(2)]
    for step in range(4):
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), whole[step])
        want = order.batch(step * 8, 8)
        assert torch.equal(whole[step], torch.from_numpy(np.stack([store.tokens(i) for i in want]).astype(np.int64)))
    store.close()


# --- refused blends ------------------------------------------------------------------------------


def _variant(tokens: Path, root: Path, name: str, **changes) -> Path:
    """A copy of a token set with manifest fields changed (written with a valid fingerprint)."""
    out = root / name
    shutil.copytree(tokens, out)
    manifest = TokensManifest.load(out)
    for field, value in changes.items():
        setattr(manifest, field, value)
    manifest.write(out)
    return out


def _refused(capsys: pytest.CaptureFixture[str], out: Path, sources: list[dict], *extra: str) -> str:
    args = ["train", "--out", str(out), "--set", f"train.sources={json.dumps(sources)}", *extra]
    for item in TINY_TRAIN_SETS:
        args += ["--set", item]
    status = main(args)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdscale train: error: ")
    assert not out.exists()
    return err


def test_bad_blends_are_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_tokens_dir: Path, tiny_cache_dir: Path
) -> None:
    out = tmp_path / "run"
    web = {"name": "web", "tokens": str(tiny_tokens_dir), "cache": str(tiny_cache_dir), "weight": 3}

    def code(tokens: Path, cache: Path | None = tiny_cache_dir, weight: float = 1) -> dict:
        return {"name": "code", "tokens": str(tokens), "cache": str(cache) if cache else None, "weight": weight}

    err = _refused(capsys, out, [web, code(tiny_tokens_dir, weight=0)])
    assert "train.sources.1.weight=0" in err and "greater than 0" in err
    other_tokenizer = _variant(tiny_tokens_dir, tmp_path, "tok", tokenizer_fingerprint="0" * 64)
    err = _refused(capsys, out, [web, code(other_tokenizer, None)])
    assert "web and code were tokenized differently (tokenizer_fingerprint" in err
    other_vocab = _variant(tiny_tokens_dir, tmp_path, "vocab", vocab_size=32000)
    err = _refused(capsys, out, [web, code(other_vocab, None)])
    assert "(vocab_size: 49152 vs 32000)" in err
    manifest = load_tokens_manifest(tiny_tokens_dir)
    fewer = {**manifest.splits, "train": manifest.splits["train"].model_copy(
        update={"shards": manifest.splits["train"].shards[1:]})}  # fmt: skip
    other_tokens = _variant(tiny_tokens_dir, tmp_path, "fewer", splits=fewer)
    err = _refused(capsys, out, [web, code(other_tokens)])
    assert "train.sources[code].cache: tokens_fingerprint: cache" in err
    unfinished = _variant(tiny_tokens_dir, tmp_path, "unfinished", complete=False)
    err = _refused(capsys, out, [web, code(unfinished)])
    assert "incomplete token set" in err and str(unfinished) in err
    err = _refused(capsys, out, [web, code(tiny_tokens_dir, None)])
    assert "web have a cache, code do not" in err
    err = _refused(capsys, out, [web, code(tiny_tokens_dir)], "--set", "train.max_samples=4")
    assert "train.max_samples=4: train.sources" in err and "replaces it" in err
    err = _refused(capsys, out, [web, {**web, "weight": 1}])
    assert "train.sources=['web', 'web']: source names must differ" in err


# --- a blended recipe, trained at two layouts, stopped and resumed --------------------------------

BLEND_TRAIN = {
    "steps": 6, "global_batch": 4, "micro_batch": 2, "log_every": 1, "eval_every": 3,
    "eval_batches": 2, "save_every": 0, "lr": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
}  # fmt: skip
BLEND_MODEL = {
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 4,
    "num_query_groups": 2, "vocab_size": 49152, "max_position_embeddings": 64,
}  # fmt: skip


def _blend_recipe(root: Path, teacher: Path, stages: list[str], weights=(3, 1), **train) -> Path:
    tree = {
        "recipe": {"name": "blend", "out": str(root / "run"), "teacher": str(teacher), "stages": stages,
                   "sources": [{"name": "web", "inputs": ["stdlib:python/json/encoder.py"],
                                "eval_inputs": ["stdlib:python/textwrap.py"], "weight": weights[0]},
                               {"name": "code", "inputs": ["stdlib:python/csv.py"],
                                "eval_inputs": ["stdlib:python/shlex.py"], "weight": weights[1]}]},
        "data": {"seq_len": 32, "shard_samples": 64},
        "cache": {"codec": {"kind": "topk", "k": 8}, "ray": {"actors": 1, "num_cpus": 2}},
        "model": BLEND_MODEL, "train": BLEND_TRAIN | train, "wandb": {"enabled": False},
    }  # fmt: skip
    path = root / f"recipe-{len(stages)}-{weights[0]}.yaml"
    path.write_text(json.dumps(tree))
    return path


def _blend_layouts(rank: int, world_size: int, sources: list[dict], init: Path, root: Path) -> None:
    from kdscale.config import load_config
    from kdscale.train.stage import run

    values = {"train": BLEND_TRAIN | {"sources": sources, "init": str(init), "out": str(root / "dp2"),
                                      "micro_batch": 1, "exit_interval": 3},
              "model": BLEND_MODEL, "wandb": {"enabled": False}}  # fmt: skip
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    run(cfg)  # stops after step 3
    run(cfg)  # the same command resumes to step 6


@pytest.fixture(scope="module")
def blend(module_tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    root = module_tmp_path
    assert main(["run", str(_blend_recipe(root, tiny_teacher_dir, ["data", "cache"]))]) == 0
    init = root / "init"
    sources = _sources(root)
    status = main(["train", "--out", str(init), "--set", f"train.sources={json.dumps(sources)}",
                   "--set", "train.steps=0", "--set", f"model={json.dumps(BLEND_MODEL)}",
                   "--set", "wandb.enabled=false"])  # fmt: skip
    assert status == 0
    recipe = _blend_recipe(root, tiny_teacher_dir, ["data", "cache", "train", "report"], init=str(init))
    assert main(["run", str(recipe)]) == 0
    run_distributed(_blend_layouts, world_size=2, args=(sources, init, root))
    return root


def _sources(root: Path) -> list[dict]:
    run = root / "run"
    return [{"name": n, "tokens": str(run / "tokens" / n), "cache": str(run / "cache" / n), "weight": w}
            for n, w in (("web", 3), ("code", 1))]  # fmt: skip


def test_recipe_tokenizes_and_caches_each_source_once(blend: Path, tiny_teacher_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = blend / "run"
    for name in ("web", "code"):
        tokens = load_tokens_manifest(run / "tokens" / name)
        assert tokens.complete and tokens.splits["eval"].samples > 0
        assert (run / "cache" / name / "manifest.json").is_file()
    config = yaml.safe_load((run / "student" / "config.yaml").read_text())
    assert [s["name"] for s in config["train"]["sources"]] == ["web", "code"]
    recipe = _blend_recipe(blend, tiny_teacher_dir, ["data", "cache", "train"], weights=(1, 1),
                           init=str(blend / "init"))  # fmt: skip
    status = main(["run", str(recipe), "--dry-run"])
    plan = capsys.readouterr().out
    assert status == 2  # refused: training's config changed
    assert "skip    data" in plan and "skip    cache" in plan and "refuse  train" in plan
    assert "train.sources" in plan  # a new mix re-runs training only


def test_blend_reports_held_out_loss_and_kl_per_source(blend: Path) -> None:
    run = blend / "run"
    lines = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/kl_teacher_tail" in line]
    assert [line["step"] for line in evals] == [3, 6]
    for line in evals:
        per_source = {n: line[f"eval/{n}/tokens"] for n in ("web", "code")}
        assert sum(per_source.values()) == line["eval/tokens"] and all(per_source.values())
        for metric in ("kl_teacher_tail", "kd_loss", "lm_loss"):
            mean = sum(line[f"eval/{n}/{metric}"] * per_source[n] for n in per_source) / line["eval/tokens"]
            assert line[f"eval/{metric}"] == pytest.approx(mean, rel=1e-9)
        assert line["eval/web/lm_loss"] != line["eval/code/lm_loss"]
    report = json.loads((run / "report" / "report.json").read_text())["rows"][0]
    assert set(report["sources"]) == {"web", "code"}
    assert report["kl_teacher_tail"] == pytest.approx(evals[-1]["eval/kl_teacher_tail"], rel=1e-4)


def test_blend_at_another_layout_stopped_and_resumed_repeats_the_losses(blend: Path) -> None:
    want = metrics(blend / "run" / "student", "loss/total")
    assert_close(metrics(blend / "dp2", "loss/total"), want, range(1, 7))
    state = read_train_state(latest_checkpoint(blend / "dp2"))
    assert state["step"] == 6 and sum(state["source_samples"].values()) == 6 * 4
    assert state["source_samples"] == {"web": 18, "code": 6}  # 3 : 1 of every batch of 4


def test_verify_checks_every_source_of_a_blended_recipe(blend: Path, tiny_teacher_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`kdscale run --verify` checks each source's token set and cache (data.out/<name>,
    cache.out/<name>), not the parent directories."""
    recipe = _blend_recipe(blend, tiny_teacher_dir, ["data", "cache"])
    capsys.readouterr()
    assert main(["run", str(recipe), "--verify", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("complete, config unchanged, verified") == 2
    shard = sorted((blend / "run" / "tokens" / "code").glob("train-*.tar"))[0]
    blob = shard.read_bytes()
    try:
        shard.write_bytes(blob[:600] + bytes([blob[600] ^ 1]) + blob[601:])
        assert main(["run", str(recipe), "--verify", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert shard.name in err and "damaged since it completed" in err
    finally:
        shard.write_bytes(blob)
