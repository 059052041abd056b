"""The Hugging Face teacher backend: chunked log-probs, bounded memory, fingerprints.

Fast tests use tiny random models saved to a temporary directory; one test uses the real
SmolLM2-135M fixture and the codec on its outputs.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM
from transformers import LlamaConfig, LlamaForCausalLM

from kdscale.cache.codec import decode, encode
from kdscale.cache.fidelity import support_kl
from kdscale.cache.sparsify import sparsify
from kdscale.config.cache import CodecConfig, TeacherConfig
from kdscale.errors import KDScaleError
from kdscale.teacher import Teacher, build_teacher
from kdscale.teacher.hf import HFTeacher

VOCAB = 1000
# fp32 on CPU: the chunked output layer runs the same matmul on fewer rows; results agree to
# a few ulps of the logits (|logit| < 10 here), far below 1e-5.
ATOL = 1e-5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_dir(module_tmp_path: Path) -> Path:
    path = module_tmp_path
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(llama_dir: Path) -> HFTeacher:
    return HFTeacher(llama_dir)


def full_log_probs(teacher: HFTeacher, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(teacher.model(input_ids=tokens).logits.float(), dim=-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_chunked_log_probs_equal_the_full_forward(teacher: HFTeacher, chunk: int) -> None:
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    starts, blocks = zip(*teacher.logits_chunks(tokens, chunk))
    assert list(starts) == list(range(0, 64, chunk))
    assert all(b.dtype == torch.float32 and b.shape[0] == 2 and b.shape[2] == VOCAB for b in blocks)
    assert all(b.shape[1] == min(chunk, 64 - s) for s, b in zip(starts, blocks))
    expected = full_log_probs(teacher, tokens)
    torch.testing.assert_close(torch.cat(blocks, 1), expected, atol=ATOL, rtol=0)


def test_chunking_bounds_the_largest_tensor(teacher: HFTeacher) -> None:
    """No module ever outputs [B, S, V]: the largest output is one [B, chunk, V] block."""
    batch, seq, chunk = 2, 96, 8
    largest: list[int] = []
    head_shapes: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest.append(output.numel())
        elif hasattr(output, "last_hidden_state"):
            largest.append(output.last_hidden_state.numel())

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    head = teacher.model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: head_shapes.append(tuple(out.shape))
    )
    try:
        tokens = torch.randint(0, VOCAB, (batch, seq))
        for _ in teacher.logits_chunks(tokens, chunk):
            pass
    finally:
        handle.remove()
        head.remove()
    assert head_shapes == [(batch, chunk, VOCAB)] * (seq // chunk)
    assert max(largest) == batch * chunk * VOCAB < batch * seq * VOCAB


def test_fingerprint_tracks_weights_and_dtype(
    teacher: HFTeacher, llama_dir: Path, tmp_path: Path
) -> None:
    fp = teacher.fingerprint()
    assert fp.startswith("hf:LlamaForCausalLM:sha256:") and fp == HFTeacher(llama_dir).fingerprint()
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    changed.save_pretrained(tmp_path / "changed")
    assert HFTeacher(tmp_path / "changed").fingerprint() != fp
    assert HFTeacher(llama_dir, dtype="bfloat16").fingerprint() != fp


def test_bfloat16_teacher_yields_normalized_float32(llama_dir: Path) -> None:
    bf16 = HFTeacher(llama_dir, dtype="bfloat16")
    tokens = torch.randint(0, VOCAB, (1, 20))
    (_, logp), = list(bf16.logits_chunks(tokens, 32))
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(1, 20), atol=1e-5, rtol=0)


def test_softcapped_logits_are_reproduced(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0,
    )
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    gemma = HFTeacher(tmp_path)
    tokens = torch.randint(0, 500, (2, 30))
    chunked = torch.cat([b for _, b in gemma.logits_chunks(tokens, 4)], 1)
    torch.testing.assert_close(chunked, full_log_probs(gemma, tokens), atol=ATOL, rtol=0)


def test_unsupported_logit_postprocessing_is_refused(tmp_path: Path) -> None:
    config = GraniteConfig(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0,
    )
    GraniteForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(KDScaleError, match="does not reproduce the model's forward"):
        HFTeacher(tmp_path)


def test_bad_inputs_raise_one_line_errors(teacher: HFTeacher, tmp_path: Path) -> None:
    with pytest.raises(KDScaleError, match=r"outside the teacher's vocabulary 0 \.\. 999"):
        next(teacher.logits_chunks(torch.tensor([[1, VOCAB]]), 4))
    with pytest.raises(KDScaleError, match="must be int64"):
        next(teacher.logits_chunks(torch.tensor([[1.0, 2.0]]), 4))
    with pytest.raises(KDScaleError, match="cache.teacher.chunk=0"):
        next(teacher.logits_chunks(torch.tensor([[1, 2]]), 0))
    with pytest.raises(KDScaleError, match="cannot load"):
        HFTeacher(tmp_path)


def test_build_teacher_from_config(llama_dir: Path, teacher: HFTeacher) -> None:
    built = build_teacher(TeacherConfig(model=str(llama_dir)))
    assert isinstance(built, Teacher) and built.vocab_size == VOCAB
    assert built.fingerprint() == teacher.fingerprint()


def test_smollm2_teacher_and_codec_on_stdlib_source(smollm2_dir: Path) -> None:
    """The real fixture: chunking is exact; top-64 and sampled N=50 fit their byte budgets."""
    from transformers import AutoTokenizer

    smol = HFTeacher(smollm2_dir)
    assert smol.vocab_size == 49152
    text = (Path(sysconfig.get_paths()["stdlib"]) / "bisect.py").read_text()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokens = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]
    blocks = [b for _, b in smol.logits_chunks(tokens, 96)]
    logp = torch.cat(blocks, 1)[0]
    # |log-prob| reaches ~50 (float32 ulp 4e-6); 30 layers of differently blocked matmuls
    # leave differences of a few 1e-5.
    torch.testing.assert_close(logp, full_log_probs(smol, tokens)[0], atol=1e-4, rtol=0)
    top64 = CodecConfig()
    targets = sparsify(logp, top64, key="bisect")
    blob = encode(targets, top64, smol.vocab_size)
    assert len(blob) / tokens.shape[1] <= 128  # measured: ~105
    assert float(support_kl(targets, decode(blob, top64, smol.vocab_size)).max()) <= 1e-3
    rs_kd = CodecConfig(kind="sampled", draws=50)
    blob = encode(sparsify(logp, rs_kd, key="bisect"), rs_kd, smol.vocab_size)
    assert len(blob) / tokens.shape[1] <= 24  # measured: ~22
