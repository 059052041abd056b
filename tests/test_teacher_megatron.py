"""The megatron-core teacher backend: a kdscale checkpoint scores tokens like its HF original."""

from __future__ import annotations

from pathlib import Path

import torch

from kdscale.cache.codec import TARGETS_MEMBER, decode
from kdscale.cache.writer import ShardTask, write_cache_shard
from kdscale.config import load_config
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.shards import check_sha256
from kdscale.data.tarindex import ShardFiles, index_shard
from kdscale.models.hf_io import import_hf
from kdscale.teacher import build_teacher, teacher_tokenizer


def test_megatron_teacher_matches_hf_and_writes_a_cache(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_tokens_dir: Path
) -> None:
    ckpt = tmp_path / "teacher_ckpt"
    import_hf(tiny_teacher_dir, ckpt)
    hf_cfg = load_config(None, [f"cache.teacher.model={tiny_teacher_dir}"]).cache
    mg_cfg = load_config(None, [f"cache.teacher.model={ckpt}", "cache.teacher.backend=megatron"]).cache
    assert teacher_tokenizer(mg_cfg.teacher) == str(ckpt / "hf")  # import-hf keeps the tokenizer
    hf, mg = build_teacher(hf_cfg.teacher), build_teacher(mg_cfg.teacher)
    assert mg.vocab_size == hf.vocab_size == 49152
    tokens = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    got = torch.cat([lp for _, lp in mg.logits_chunks(tokens, 7)], dim=1)
    want = torch.cat([lp for _, lp in hf.logits_chunks(tokens, 24)], dim=1)
    assert got.shape == want.shape == (2, 24, 49152)
    assert (got - want).abs().max() < 1e-4
    assert mg.fingerprint().startswith("megatron:GPTModel:sha256:") and mg.fingerprint() != hf.fingerprint()

    shard = load_tokens_manifest(tiny_tokens_dir).splits["eval"].shards[0]
    out = tmp_path / shard.name
    task = ShardTask("eval", str(tiny_tokens_dir / shard.name), shard.sha256, str(out), shard.samples, 32)
    record = write_cache_shard(task, mg, mg_cfg)
    check_sha256(out, record.sha256, "cache shard")
    index = index_shard(out, TARGETS_MEMBER, "cache shard")
    assert len(index) == shard.samples
    first = ShardFiles().read(out, index, 0)
    assert decode(first, mg_cfg.codec, 49152).ids.shape == (1, 32, 64)
    assert record.fidelity.kl_mean is not None and record.fidelity.kl_mean < 1.0
