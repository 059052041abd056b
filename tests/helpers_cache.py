"""Shared builders for tests that need token shards, a tiny teacher, and a real Ray-made cache.

The tiny teacher is a random ``LlamaForCausalLM`` (hidden 32, 2 layers) saved by transformers
together with the SmolLM2 fixture's tokenizer, so token sets made with ``smollm2-135m`` fit it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kdscale.cache.manifest import load_cache_manifest
from kdscale.cli import main

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_teacher(out: Path, tokenizer_dir: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Llama teacher with the fixture's vocabulary and tokenizer, saved as an HF dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=2, bos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peaked, teacher-like output distribution
        model.model.embed_tokens.weight.mul_(40.0)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def make_tokens(
    out: Path, *extra: str, seq_len: int = 32, shard_samples: int = 64, source: str = "stdlib:python/json"
) -> Path:
    """Token shards of ``source`` (held out: stdlib ``textwrap.py``) with the fixture tokenizer."""
    status = main(
        ["data", "--input", source, "--eval-input", "stdlib:python/textwrap.py",
         "--seq-len", str(seq_len), "--shard-samples", str(shard_samples), "--out", str(out), *extra]
    )
    assert status == 0
    return out


def make_cache(tokens: Path, out: Path, teacher: Path | str, *extra: str) -> Path:
    """A cache made by the real ``kdscale cache`` (local Ray, one actor)."""
    status = main(
        ["cache", "--tokens", str(tokens), "--out", str(out), "--teacher", str(teacher),
         "--set", "cache.ray.num_cpus=2", "--set", "wandb.enabled=false", *extra]
    )
    assert status == 0
    return out


def shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    """Every committed shard of a cache, by name."""
    return {name: (cache_dir / name).read_bytes() for name in load_cache_manifest(cache_dir).shards}


def reference_shards(tokens_dir: Path, teacher: str, tmp: Path, *overrides: str) -> dict[str, bytes]:
    """Cache shards written in this process, without Ray: what every run must reproduce."""
    from kdscale.cache.writer import ShardTask, write_cache_shard
    from kdscale.config import load_config
    from kdscale.data.manifest import load_tokens_manifest
    from kdscale.teacher import build_teacher

    cfg = load_config(None, [f"cache.teacher.model={teacher}", *overrides]).cache
    model = build_teacher(cfg.teacher)
    tokens = load_tokens_manifest(tokens_dir)
    out = {}
    for split in cfg.splits:
        for shard in tokens.splits[split].shards:
            task = ShardTask(split, str(tokens_dir / shard.name), shard.sha256, str(tmp / shard.name), shard.samples, tokens.seq_len)
            write_cache_shard(task, model, cfg)
            out[shard.name] = (tmp / shard.name).read_bytes()
    return out
