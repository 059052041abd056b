"""Teachers as tensor/pipeline-parallel Ray actor groups (gloo), sparsified vocab-parallel.

One local Ray instance serves the module (``kdscale cache`` attaches to it). The teacher is a
tiny random Llama (hidden 32, 2 layers, 4 heads, 2 KV groups, vocab 49152) imported as a kdscale
model directory; the reference is the same teacher at TP = PP = 1, run in this process.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kdscale.cache.codec import TARGETS_MEMBER, decode
from kdscale.cache.groups import KILL_HOOK_ENV
from kdscale.cache.manifest import load_cache_manifest
from kdscale.cache.reader import open_cache
from kdscale.cache.sparsify import sample_uniforms
from kdscale.cache.writer import ShardTask, write_cache_shard
from kdscale.cli import main
from kdscale.config import load_config
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.shards import iter_token_shard
from kdscale.data.tarindex import ShardFiles, index_shard
from kdscale.errors import KDScaleError

CODECS = {"topk": (), "sampled": ("cache.codec.kind=sampled", "cache.codec.draws=64")}
TP2, PP2 = "cache.teacher.tensor_parallel=2", "cache.teacher.pipeline_parallel=2"
BASE = ("cache.teacher.backend=megatron", "cache.splits=[eval]", "wandb.enabled=false")


@pytest.fixture(scope="module")
def hook_dir(module_tmp_path: Path) -> Path:
    path = module_tmp_path / "kill-hook"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def local_ray(hook_dir: Path):
    """A local Ray instance (loopback only) whose processes see the kill hook's directory."""
    import ray

    from kdscale.cache.local_ray import loopback_only

    os.environ[KILL_HOOK_ENV] = str(hook_dir)  # inherited by every process Ray starts
    try:
        with loopback_only():
            ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
                     _temp_dir=str(Path(os.environ["TMPDIR"]).resolve() / "kdscale-ray"),
                     configure_logging=False, log_to_driver=False)  # fmt: skip
            yield ray
    finally:
        ray.shutdown()
        os.environ.pop(KILL_HOOK_ENV, None)


@pytest.fixture(scope="module")
def teacher_dir(module_tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    from kdscale.models.hf_io import import_hf

    out = module_tmp_path / "teacher"
    import_hf(tiny_teacher_dir, out)
    return out


@pytest.fixture(scope="module")
def teacher_dir_tp2(module_tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    """The same teacher imported at the layout of a TP = 2 group (two spawned ranks): the TP = 2
    groups below load it as is."""

    out = module_tmp_path / "teacher-tp2"
    assert main(["import-hf", str(tiny_teacher_dir), str(out), "--tensor-parallel", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def references(module_tmp_path: Path, tiny_tokens_dir: Path, teacher_dir: Path):
    """``kind → (dir, {shard: record})``: TP = 1 caches of the eval split for every codec,
    written in this process (no Ray); ``"teacher"`` → that TP = 1 teacher."""
    from kdscale.teacher import build_teacher

    root = module_tmp_path / "reference"
    tokens = load_tokens_manifest(tiny_tokens_dir)
    teacher = build_teacher(_config(teacher_dir).teacher)
    out = {}
    try:
        for kind, sets in CODECS.items():
            cfg, records = _config(teacher_dir, *sets), {}
            (root / kind).mkdir(parents=True)
            for shard in tokens.splits["eval"].shards:
                task = ShardTask("eval", str(tiny_tokens_dir / shard.name), shard.sha256,
                                 str(root / kind / shard.name), shard.samples, tokens.seq_len)  # fmt: skip
                records[shard.name] = write_cache_shard(task, teacher, cfg)
            out[kind] = (root / kind, records)
        yield out | {"teacher": teacher}
    finally:
        teacher.close()


def _config(teacher: Path, *sets: str):
    return load_config(None, [f"cache.teacher.model={teacher}", *BASE, *sets]).cache


def _cache(tokens: Path, out: Path, teacher: Path, *sets: str) -> tuple[int, str]:
    argv = ["cache", "--tokens", str(tokens), "--out", str(out), "--teacher", str(teacher)]
    for item in (*BASE, *sets):
        argv += ["--set", item]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def _decoded(cache: Path, *sets: str) -> list:
    codec = load_config(None, list(sets)).cache.codec
    out = []
    for name in sorted(p.name for p in cache.glob("*.tar")):
        index = index_shard(cache / name, TARGETS_MEMBER, "cache shard")
        out += [decode(ShardFiles().read(cache / name, index, i), codec, 49152) for i in range(len(index))]
    return out


@pytest.fixture(scope="module")
def group_caches(local_ray, module_tmp_path: Path, tiny_tokens_dir: Path, teacher_dir: Path, teacher_dir_tp2: Path):
    """``(layout, kind) → cache dir`` made by `kdscale cache` with a teacher group, once each
    (TP = 2 groups load the checkpoint written at TP = 2)."""
    made: dict[tuple[str, str], Path] = {}

    def get(layout: str, kind: str) -> Path:
        if (layout, kind) not in made:
            out = module_tmp_path / "groups" / f"{layout}-{kind}"
            teacher = teacher_dir_tp2 if layout == TP2 else teacher_dir
            status, err = _cache(tiny_tokens_dir, out, teacher, layout, *CODECS[kind])
            assert status == 0, err[-3000:]
            made[layout, kind] = out
        return made[layout, kind]

    return get


def _shards(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("*.tar"))}


def _assert_same_fidelity(cache: Path, records: dict) -> None:
    """Manifest fidelity statistics equal to the TP = 1 ones within float noise."""
    shards = load_cache_manifest(cache).shards
    assert set(shards) == set(records)
    for name, record in shards.items():
        want = records[name].fidelity.model_dump()
        for field, value in record.fidelity.model_dump().items():
            if isinstance(value, float):
                assert value == pytest.approx(want[field], rel=1e-6, abs=1e-6), (name, field)
            else:
                assert value == want[field], (name, field)


@pytest.mark.parametrize("layout", [TP2, PP2])
def test_topk_of_a_group_matches_one_rank(group_caches, references, layout: str) -> None:
    got_dir = group_caches(layout, "topk")
    ref_dir, records = references["topk"]
    identical = _shards(got_dir) == _shards(ref_dir)
    print(f"\n{layout} topk: shards byte-identical to TP=PP=1: {identical}")
    codec = load_config(None, []).cache.codec
    for want, got in zip(_decoded(ref_dir), _decoded(got_dir), strict=True):
        assert torch.equal(want.ids, got.ids)
        # one quantization step at the reference's probability (the codec's step grows as
        # quant_step / sqrt(p) up to quant_step_max), plus float noise
        step = (codec.quant_step / want.logp.double().exp().sqrt()).clamp(max=codec.quant_step_max)
        assert bool(((want.logp.double() - got.logp.double()).abs() <= step + 1e-6).all())
    _assert_same_fidelity(got_dir, records)


def test_sampled_draws_of_a_tensor_parallel_group_match_one_rank(group_caches, references, tiny_tokens_dir) -> None:
    got_dir = group_caches(TP2, "sampled")
    ref_dir, records = references["sampled"]
    samples = [s for name in sorted(p.name for p in ref_dir.glob("*.tar")) for s in iter_token_shard(tiny_tokens_dir / name)]
    positions, moved = 0, []
    for (key, tokens), want, got in zip(samples, _decoded(ref_dir, *CODECS["sampled"]), _decoded(got_dir, *CODECS["sampled"]), strict=True):
        for s in range(want.shape[1]):
            positions += 1
            a = {int(i): float(lp) for i, lp in zip(want.ids[0, s], want.logp[0, s]) if i >= 0}
            b = {int(i): float(lp) for i, lp in zip(got.ids[0, s], got.logp[0, s]) if i >= 0}
            if a != b:
                moved.append((key, tokens, s))
    margins = [_boundary_margin(references["teacher"], *where) for where in moved]
    identical = _shards(got_dir) == _shards(ref_dir)
    print(f"\nsampled TP=2: {len(moved)} of {positions} positions drew differently (their nearest "
          f"uniform-to-CDF-boundary distances, relative: {[f'{m:.1e}' for m in margins]}); "
          f"byte-identical: {identical}")
    # A draw moves only where its uniform lies within float rounding of a CDF boundary: the
    # TP = 2 model's logits differ from TP = 1 by rounding (its row-parallel layers sum partial
    # products in another order; |logit| reaches ~40 here, so ~1e-5 relative in probabilities).
    # The sampler itself, fed identical logits, moves none (tests/test_vocab_parallel.py).
    assert all(m < 1e-5 for m in margins)
    assert len(moved) <= 1e-3 * positions
    _assert_same_fidelity(got_dir, records)


def _boundary_margin(teacher, key: str, tokens, position: int) -> float:
    """How close the nearest of a position's uniforms comes to a boundary of the TP = 1
    teacher's CDF, relative to the total mass."""
    codec = load_config(None, list(CODECS["sampled"])).cache.codec
    inputs = torch.from_numpy(tokens[None, :-1].astype("int64"))
    logp = next(lp for start, lp in teacher.logits_chunks(inputs, 1 << 20))[0, position]
    cdf = (logp.float() - logp.max()).exp().cumsum(-1, dtype=torch.float64)
    target = torch.from_numpy(sample_uniforms(key, codec.seed, np.array([position]), codec.draws))[0] * cdf[-1]
    return float((cdf[None, :] - target[:, None]).abs().min() / cdf[-1])


def test_a_rank_killed_mid_shard_reforms_the_group(group_caches, hook_dir, tiny_tokens_dir, teacher_dir_tp2, tmp_path) -> None:
    """Rank 1 of a TP = 2 group SIGKILLs itself on the first shard it is handed (rank 0 is in
    the shard, waiting in the group's first collective): the group re-forms, the shard is
    retried, and the cache equals an uninterrupted run, each shard committed once."""
    (hook_dir / "arm").touch()
    try:
        status, err = _cache(tiny_tokens_dir, tmp_path / "cache", teacher_dir_tp2, TP2)
    finally:
        (hook_dir / "arm").unlink()
    assert status == 0, err[-3000:]
    assert (hook_dir / "fired").exists()
    assert "re-forming the group (restart 1)" in err
    out = tmp_path / "cache"
    assert not list(out.glob(".*.tmp"))
    keys = [key for key, _, _ in open_cache(out).iter_split("eval")]
    assert len(keys) == len(set(keys)) == load_tokens_manifest(tiny_tokens_dir).splits["eval"].samples
    assert _shards(out) == _shards(group_caches(TP2, "topk"))


def test_a_group_larger_than_any_node_is_refused_before_it_loads(local_ray, tiny_tokens_dir, teacher_dir, tmp_path) -> None:
    status, err = _cache(tiny_tokens_dir, tmp_path / "cache", teacher_dir,
                         TP2, "cache.ray.cpus_per_actor=3")  # fmt: skip
    lines = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and len(lines) == 1, err
    assert "= 2 actors needs 6 CPU on one node (3 per actor)" in lines[0]
    assert "nodes' CPU: 4" in lines[0]
    assert not (tmp_path / "cache" / "manifest.json").exists()  # no teacher was loaded


def test_import_hf_at_a_layout_holds_the_same_weights(references, teacher_dir, teacher_dir_tp2) -> None:
    """The TP = 2 checkpoint (loaded at TP = 2 by the groups above) read back at TP = 1 holds
    exactly the weights of the TP = 1 import, so it gives the same logits."""
    from kdscale.models.checkpoints import read_train_state
    from kdscale.teacher.megatron import MegatronTeacher

    assert read_train_state(teacher_dir_tp2)["origin"]["layout"] == {"tensor": 2, "pipeline": 1}
    want = references["teacher"].fingerprint()
    references["teacher"].close()
    teacher = MegatronTeacher(teacher_dir_tp2)
    try:
        assert teacher.fingerprint() == want
    finally:
        teacher.close()


@pytest.mark.parametrize("key", ["tensor_parallel", "pipeline_parallel"])
def test_a_teacher_group_needs_the_megatron_backend(key: str) -> None:
    with pytest.raises(KDScaleError) as refused:
        load_config(None, [f"cache.teacher.{key}=2"])
    assert str(refused.value) == (
        f"config error: cache.teacher.{key}=2: a teacher group needs cache.teacher.backend=megatron (got hf)"
    )


def test_a_megatron_teacher_runs_in_the_configured_dtype(references, teacher_dir) -> None:
    """``cache.teacher.dtype=bfloat16`` holds the weights in bf16 (half the memory of a rank) and
    still yields float32 log-probs close to the float32 teacher's."""
    from kdscale.teacher import build_teacher

    references["teacher"].close()  # one megatron parallel state per process
    tokens = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(3))
    logp = {}
    for dtype in ("float32", "bfloat16"):
        teacher = build_teacher(_config(teacher_dir, f"cache.teacher.dtype={dtype}").teacher)
        try:
            assert {p.dtype for p in teacher.gpt.parameters()} == {getattr(torch, dtype)}
            logp[dtype] = torch.cat([lp for _, lp in teacher.logits_chunks(tokens, 8)], dim=1)
        finally:
            teacher.close()
    assert logp["bfloat16"].dtype == torch.float32
    probs = logp["float32"].exp()
    assert float((probs - logp["bfloat16"].exp()).abs().sum(-1).max()) < 0.05  # total variation × 2
