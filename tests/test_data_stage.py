"""Data stage: real tokenizer (the SmolLM2 fixture), real webdataset shards, every input kind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdscale.cli import main
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.packing import Packer
from kdscale.data.shards import iter_token_shard, sample_key
from kdscale.data.tokenizer import Tokenizer
from kdscale.errors import KDScaleError

DOCS = [
    f"Document {i}: " + " ".join(f"token{j * (i + 1) % 97} is word number {j}." for j in range(40 + 7 * i))
    for i in range(12)
]


def run_data(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(["data", *args])
    return status, capsys.readouterr().err


def read_split(root: Path, split: str) -> list[tuple[str, np.ndarray]]:
    manifest = load_tokens_manifest(root)
    return [item for path in manifest.shard_paths(root, split) for item in iter_token_shard(path)]


def test_packer_uses_every_token_as_a_label_once() -> None:
    packer = Packer(seq_len=4, separator_id=99)
    samples = packer.add(np.arange(6)) + packer.add(np.arange(10, 13))
    # stream: 0 1 2 3 4 5 99 10 11 12 99 -> windows of 5 with stride 4
    assert [s.tolist() for s in samples] == [[0, 1, 2, 3, 4], [4, 5, 99, 10, 11]]
    assert packer.leftover == 2  # 11 12 99: two more labels would need a full window
    labels = np.concatenate([s[1:] for s in samples])
    assert labels.tolist() == [1, 2, 3, 4, 5, 99, 10, 11]


def test_stdlib_corpus_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tokens"
    status, err = run_data(
        capsys, "--input", "stdlib:python/json", "--seq-len", "64", "--shard-samples", "40",
        "--eval-fraction", "0.3", "--out", str(out),
    )
    assert status == 0, err
    manifest = load_tokens_manifest(out)
    tokenizer = Tokenizer("smollm2-135m")
    assert manifest.tokenizer_fingerprint == tokenizer.info.fingerprint
    assert manifest.vocab_size == 49152 and manifest.dtype == "<u2"
    assert manifest.eos_id == 2  # the model config's EOS, not the GGUF tokenizer's <|im_start|>
    assert (out / "config.yaml").is_file()
    for split in ("train", "eval"):
        record = manifest.splits[split]
        samples = read_split(out, split)
        assert len(samples) == record.samples > 0
        assert [s.samples for s in record.shards] == [min(40, record.samples - 40 * i) for i in range(len(record.shards))]
        for key, tokens in samples:
            assert tokens.dtype == np.dtype("<u2") and tokens.shape == (65,)
            assert key == sample_key(tokens)
    train_keys = {k for k, _ in read_split(out, "train")}
    assert train_keys.isdisjoint(k for k, _ in read_split(out, "eval"))
    # the packed train stream decodes back to real source text
    text = "".join(
        tokenizer._tok.decode(t[:-1].astype(np.int64).tolist()) for _, t in read_split(out, "train")
    )
    assert "def " in text and "import " in text


def test_same_inputs_give_byte_identical_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--input", "stdlib:python/json", "--seq-len", "32", "--eval-fraction", "0.2"]
    for name in ("a", "b"):
        assert run_data(capsys, *args, "--out", str(tmp_path / name))[0] == 0
    a, b = load_tokens_manifest(tmp_path / "a"), load_tokens_manifest(tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    for rec in a.splits["train"].shards + a.splits["eval"].shards:
        assert (tmp_path / "a" / rec.name).read_bytes() == (tmp_path / "b" / rec.name).read_bytes()


def _write_inputs(root: Path, tokenizer: Tokenizer) -> dict[str, str]:
    txt = root / "txt"
    txt.mkdir()
    for i, doc in enumerate(DOCS):
        (txt / f"doc{i:03d}.txt").write_text(doc)
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    parquet = root / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "body": DOCS}), parquet, row_group_size=5)
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = root / "megatron_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for ids in tokenizer.encode_batch(DOCS):
        builder.add_document(torch.from_numpy(ids.astype(np.int32)), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return {"txt": str(txt), "jsonl": str(jsonl), "parquet": str(parquet), "megatron": f"{prefix}.bin"}


def test_every_input_kind_gives_the_same_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = _write_inputs(tmp_path, Tokenizer("smollm2-135m"))
    fingerprints = {}
    for kind, path in inputs.items():
        out = tmp_path / f"out-{kind}"
        status, err = run_data(
            capsys, "--input", path, "--text-field", "body", "--seq-len", "48", "--eval-fraction", "0.25",
            "--out", str(out),
        )
        assert status == 0, f"{kind}: {err}"
        fingerprints[kind] = load_tokens_manifest(out).fingerprint
    assert len(set(fingerprints.values())) == 1, fingerprints


def test_separate_eval_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    held = tmp_path / "held.txt"
    held.write_text(DOCS[0] * 3)
    out = tmp_path / "tokens"
    status, err = run_data(
        capsys, "--input", "stdlib:python/json", "--eval-input", str(held), "--seq-len", "32", "--out", str(out)
    )
    assert status == 0, err
    manifest = load_tokens_manifest(out)
    assert manifest.splits["eval"].samples > 0
    text = "".join(Tokenizer("smollm2-135m")._tok.decode(t[:-1].astype(np.int64).tolist()) for _, t in read_split(out, "eval"))
    assert "Document 0" in text


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--input", str(d / "missing.txt")], "does not exist"),
        (lambda d: ["--input", str(d / "empty")], "holds no .txt files"),
        (lambda d: ["--input", str(d / "tiny.txt")], "not enough for one training sample"),
        (lambda d: ["--input", str(d / "docs.parquet"), "--text-field", "nope"], "no column 'nope'"),
        (lambda d: ["--input", str(d / "docs.parquet"), "--text-field", "id"], "expected a string column"),
        (lambda d: ["--input", str(d / "bad.jsonl")], "not valid JSON"),
        (lambda d: ["--input", str(d / "tiny.txt"), "--tokenizer", str(d / "empty")], "cannot load a tokenizer"),
        (lambda d: ["--input", str(d / "tiny.txt"), "--tokenizer", "no-such-model"], "neither a local"),
        (lambda d: ["--input", str(d / "tiny.txt"), "--seq-len", "1"], "data.seq_len=1"),
    ],
)
def test_bad_input_exits_2_and_leaves_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_args, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny.txt").write_text("hello world")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n')
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"]}), tmp_path / "docs.parquet")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    status, err = run_data(capsys, "--seq-len", "64", *make_args(tmp_path), "--out", str(out))
    assert status == 2
    assert message in err and err.strip().count("\n") == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial output, no temp dirs


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, err = run_data(capsys, "--input", "stdlib:python/json", "--seq-len", "32", "--out", str(out))
    assert status == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    status, _ = run_data(capsys, "--input", "stdlib:python/json", "--seq-len", "32", "--out", str(out), "--overwrite")
    assert status == 0 and not (out / "keep.txt").exists()


def test_out_of_vocab_tokenized_input_is_refused(tmp_path: Path) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from kdscale.config import load_config
    from kdscale.data.stage import run

    prefix = tmp_path / "big_ids"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    builder.add_document(torch.arange(49150, 49250, dtype=torch.int32), [100])
    builder.finalize(f"{prefix}.idx")
    cfg = load_config(None, [f"data.inputs=['{prefix}']", f"data.out={tmp_path / 'out'}", "data.seq_len=16"])
    with pytest.raises(KDScaleError, match="outside the tokenizer's vocabulary"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_damaged_token_shard_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tokens"
    assert run_data(capsys, "--input", "stdlib:python/json", "--seq-len", "32", "--out", str(out))[0] == 0
    record = load_tokens_manifest(out).splits["train"].shards[0]
    path = out / record.name
    blob = bytearray(path.read_bytes())
    blob[700] ^= 0xFF  # one flipped byte inside the first sample's payload
    path.write_bytes(bytes(blob))
    with pytest.raises(KDScaleError, match=f"{record.name}.*corrupt"):
        list(iter_token_shard(path, sha256=record.sha256))
    path.write_bytes(bytes(blob[: len(blob) // 3]))  # truncated mid-member
    with pytest.raises(KDScaleError, match=f"{record.name}.*damaged"):
        list(iter_token_shard(path))
