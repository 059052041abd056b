"""megatron-core on CPU/gloo: TP=2, PP=2 (1F1B), PP=2×VP=2 (interleaved) and DP=2 each
reproduce the single-rank training run; and the CPU shim itself.

Real parts only: the kdscale GPT builder (Llama style: RMSNorm, SwiGLU, RoPE, GQA, tied
embeddings), megatron's DistributedDataParallel, get_megatron_optimizer (Adam, clip_grad 1.0,
the distributed optimizer for TP=2 and DP=2), finalize_model_grads and
get_forward_backward_func. One spawned rank trains the reference and saves its initial
weights with dist_checkpointing; two spawned ranks load that checkpoint at each other layout
in turn and train on the same global batch (each data-parallel rank on its share).

Tolerance: every layout runs the same fp32 math; only the order of floating-point sums
differs (a split matmul, an all-reduce). Measured: losses move by < 2e-7 and gradient norms
by < 2e-6 relative. 1e-5 relative sits above that and far below what a wrong shard, a
swapped pipeline message, a missed gradient all-reduce or a skipped update causes (> 1e-3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import random as megatron_random

from kdscale.config import ModelConfig, ParallelConfig
from kdscale.models import build_model_chunks, count_parameters
from kdscale.models.cpu_shim import is_patched, patch_megatron_for_cpu
from kdscale.models.parallel import destroy_parallel, initialize_parallel
from tests.dist import run_distributed

MODEL = ModelConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=176,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    max_position_embeddings=64,
    tie_embeddings=True,
)
SEQ_LEN = 32
MICROBATCHES = 4  # per global batch, one sample each; 1F1B at PP=2 needs >= 2
STEPS = 3  # losses compared: the initial one and one after each of STEPS optimizer steps
SEED = 1234

# name → (layout, use_distributed_optimizer)
LAYOUTS = {
    "tp2": (ParallelConfig(tensor=2), True),
    "pp2": (ParallelConfig(pipeline=2), False),
    "dp2": (ParallelConfig(), True),
    "pp2_vp2": (ParallelConfig(pipeline=2, virtual_pipeline=2), False),
}


def _global_batch() -> torch.Tensor:
    """[MICROBATCHES, 1, SEQ_LEN + 1] token ids, the same in every process.

    Every step trains on this one batch, so the loss falls visibly within a few steps.
    """
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, MODEL.vocab_size, (MICROBATCHES, 1, SEQ_LEN + 1), generator=gen)


def _forward_step(data_iterator: Iterator[torch.Tensor], model: torch.nn.Module):
    tokens = next(data_iterator)
    per_token_loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:])

    def loss_func(output: torch.Tensor):
        loss = output.float().mean()
        # A copy: the schedule divides the returned loss by the microbatch count in place.
        return loss, {"loss": loss.detach().clone()}

    return per_token_loss, loss_func


def _train(
    parallel: ParallelConfig, distributed_optimizer: bool, checkpoint: Path, save: bool
) -> dict[str, Any]:
    """Build at ``parallel``, save or load the initial weights, train; return this rank's losses.

    The loading runs initialize with another seed, so only the checkpoint can make their
    weights equal to the reference's.
    """
    initialize_parallel(parallel, seed=SEED if save else SEED + 1)
    chunks = build_model_chunks(MODEL, parallel)  # one per virtual pipeline stage
    built_parameters = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    # One call for all chunks: the checkpoint's tensors are validated as a whole.
    sharded = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    if save:
        dist_checkpointing.save(sharded, str(checkpoint))
    else:
        state = dist_checkpointing.load(sharded, str(checkpoint))
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"chunk{i}"])

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
    ddp = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=5e-3,
            weight_decay=0.01,
            clip_grad=1.0,
            use_distributed_optimizer=distributed_optimizer,
        ),
        ddp,
    )
    config = chunks[0].config  # the schedules and finalize_model_grads read the first chunk's
    config.no_sync_func = [m.no_sync for m in ddp] if len(ddp) > 1 else ddp[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    # This data-parallel rank's contiguous share of each global batch.
    dp_size = parallel_state.get_data_parallel_world_size()
    share = MICROBATCHES // dp_size
    first = parallel_state.get_data_parallel_rank() * share
    last_stage = parallel_state.is_pipeline_last_stage()
    losses, grad_norms = [], []
    schedule = get_forward_backward_func()
    batch = _global_batch()
    for _ in range(STEPS + 1):
        for model in ddp:
            model.zero_grad_buffer()
        optimizer.zero_grad()
        loss_dicts = schedule(
            forward_step_func=_forward_step,
            data_iterator=[iter(batch[first : first + share]) for _ in chunks],
            model=ddp,
            num_microbatches=share,
            seq_length=SEQ_LEN,
            micro_batch_size=1,
        )
        _, grad_norm, _ = optimizer.step()
        grad_norms.append(grad_norm)
        if last_stage:
            loss = torch.stack([d["loss"] for d in loss_dicts]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append((loss / dp_size).item())
    destroy_parallel()
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "parameters": built_parameters,
        "schedule": schedule.__name__,
    }


def _reference_worker(rank: int, world_size: int, checkpoint: Path) -> dict[str, Any]:
    result = _train(ParallelConfig(), distributed_optimizer=False, checkpoint=checkpoint, save=True)
    initialize_parallel(ParallelConfig(), seed=SEED)
    (untied,) = build_model_chunks(
        MODEL.model_copy(update={"tie_embeddings": False}), ParallelConfig()
    )
    result["untied_parameters"] = sum(p.numel() for p in untied.parameters())
    destroy_parallel()
    return result


def _layouts_worker(rank: int, world_size: int, checkpoint: Path) -> dict[str, dict[str, Any]]:
    return {
        name: _train(parallel, distributed_optimizer=dist_opt, checkpoint=checkpoint, save=False)
        for name, (parallel, dist_opt) in LAYOUTS.items()
    }


@pytest.fixture(scope="module")
def runs(module_tmp_path: Path) -> dict[str, Any]:
    """The reference run (1 rank) and every 2-rank layout (one spawn for all of them)."""
    checkpoint = module_tmp_path / "initial"
    checkpoint.mkdir()
    (reference,) = run_distributed(_reference_worker, world_size=1, args=(checkpoint,))
    layouts = run_distributed(_layouts_worker, world_size=2, args=(checkpoint,))
    return {"reference": reference, "layouts": layouts}


def _assert_matches_reference(got: list[float], want: list[float]) -> None:
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )


def test_reference_trains_and_clips(runs: dict[str, Any]) -> None:
    reference = runs["reference"]
    assert len(reference["losses"]) == STEPS + 1
    assert reference["losses"][-1] < reference["losses"][0] - 0.1  # the optimizer really steps
    assert reference["grad_norms"][0] > 1.0  # so clip_grad=1.0 really rescales gradients


def test_built_parameters_match_count_parameters(runs: dict[str, Any]) -> None:
    untied = MODEL.model_copy(update={"tie_embeddings": False})
    assert runs["reference"]["parameters"] == count_parameters(MODEL)
    assert runs["reference"]["untied_parameters"] == count_parameters(untied)
    assert (
        count_parameters(untied) == count_parameters(MODEL) + MODEL.vocab_size * MODEL.hidden_size
    )


def test_tensor_parallel_2_matches_single_rank(runs: dict[str, Any]) -> None:
    reference, (rank0, rank1) = runs["reference"], [r["tp2"] for r in runs["layouts"]]
    _assert_matches_reference(rank0["losses"], reference["losses"])
    assert rank1["losses"] == rank0["losses"]  # tensor ranks compute one loss
    _assert_matches_reference(rank0["grad_norms"], reference["grad_norms"])


def test_pipeline_parallel_2_1f1b_matches_single_rank(runs: dict[str, Any]) -> None:
    first, last = [r["pp2"] for r in runs["layouts"]]
    assert last["schedule"] == "forward_backward_pipelining_without_interleaving"  # 1F1B
    assert first["losses"] == []  # only the last stage computes the loss
    _assert_matches_reference(last["losses"], runs["reference"]["losses"])
    _assert_matches_reference(last["grad_norms"], runs["reference"]["grad_norms"])
    # Tied embeddings: the last stage holds its own output-layer copy of the embedding.
    tied_copy = MODEL.vocab_size * MODEL.hidden_size
    assert first["parameters"] + last["parameters"] == runs["reference"]["parameters"] + tied_copy


def test_interleaved_pipeline_2x2_matches_single_rank(runs: dict[str, Any]) -> None:
    first, last = [r["pp2_vp2"] for r in runs["layouts"]]
    assert last["schedule"] == "forward_backward_pipelining_with_interleaving"
    assert first["losses"] == []
    _assert_matches_reference(last["losses"], runs["reference"]["losses"])
    _assert_matches_reference(last["grad_norms"], runs["reference"]["grad_norms"])


def test_data_parallel_2_distributed_optimizer_matches_single_rank(runs: dict[str, Any]) -> None:
    rank0, rank1 = [r["dp2"] for r in runs["layouts"]]
    _assert_matches_reference(rank0["losses"], runs["reference"]["losses"])
    assert rank1["losses"] == rank0["losses"]
    _assert_matches_reference(rank0["grad_norms"], runs["reference"]["grad_norms"])


# --- The shim itself, in this process (importing kdscale.models above applied it). ------------


def _shim_state() -> tuple:
    return (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        megatron_random.CudaRNGStatesTracker.add,
        megatron_random.CudaRNGStatesTracker.fork,
        megatron_random._get_cuda_rng_state,
        megatron_random._set_cuda_rng_state,
        tuple(torch.overrides._get_current_function_mode_stack()),
    )


cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the shim applies only without CUDA"
)


def test_shim_is_applied_exactly_when_cuda_is_absent() -> None:
    assert is_patched() == (not torch.cuda.is_available())


@cpu_only
def test_shim_applies_once_and_reapplying_changes_nothing() -> None:
    before = _shim_state()
    assert patch_megatron_for_cpu() is False
    assert _shim_state() == before


@cpu_only
def test_shim_leaves_working_calls_alone() -> None:
    t = torch.ones(3)
    assert t.type() == "torch.FloatTensor"  # the CUDA type names stay inside megatron's checks
    assert torch.zeros(2, device="cpu").device.type == "cpu"
    assert torch.equal(t.to(torch.float64), torch.ones(3, dtype=torch.float64))
    assert not torch.cuda.is_available()


@cpu_only
def test_shim_maps_cuda_requests_to_the_cpu() -> None:
    t = torch.ones(3)
    assert t.cuda() is t
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty_like(t, device=torch.device("cuda", 0)).device.type == "cpu"
    assert t.to("cuda").device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # a no-op, not an error


@cpu_only
def test_shim_rng_tracker_forks_the_cpu_generator() -> None:
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(99)
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the fork restores the outer stream
    with tracker.fork():
        second = torch.rand(3)  # and continues its own
    model_parallel_stream = torch.rand(6, generator=torch.Generator().manual_seed(7 + 2718))
    assert torch.equal(torch.cat([first, second]), model_parallel_stream)


@cpu_only
def test_shim_lets_megatron_clip_cpu_gradients() -> None:
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(param.grad, torch.full((4,), 2.0 / (4.0 + 1e-6)))
