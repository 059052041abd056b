"""Bad inputs and hostile environments: every failure is one line, and nothing is left behind
that blocks the corrected command.

Each case runs the real command on real files; a full disk is a real small tmpfs mounted in a
private mount namespace (``unshare``) around one process that runs ``kdscale data``, ``train``
and ``cache`` into it. A second writer of a directory meets a real process holding its lock.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_STUDENT
from helpers_integrity import assert_one_line_error, run_cli

NON_UTF8 = b"data:\n  seq_len: 32\n  text_field: \xff\xfe\n"
STUDENT = [a for s in TINY_STUDENT for a in ("--set", s)]


def _make_files(tmp: Path, teacher: Path) -> None:
    """The damaged files the cases read."""
    (tmp / "plain-file").write_text("x")
    (tmp / "bad.yaml").write_bytes(NON_UTF8)
    (tmp / "recipe.yaml").write_bytes(b"recipe: {out: " + str(tmp).encode() + b"/r, stages: [data]}\n"
                                      + NON_UTF8)
    (tmp / "docs.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "\xc3\x28"}\n')
    (tmp / "hf").mkdir()
    shutil.copy(teacher / "config.json", tmp / "hf" / "config.json")
    (tmp / "hf" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def _cases(tmp: Path, tokens: Path, teacher: Path, run: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the one-line error must hold)."""
    data = ["data", "--input", "stdlib:python/json/tool.py", "--tokenizer", str(teacher)]
    cache = ["cache", "--tokens", str(tokens), "--teacher", str(teacher)]
    return {
        "--out under a plain file": (data + ["--out", str(tmp / "plain-file" / "tokens")],
                                     "is a file, not a directory"),
        "--out under /proc": (data + ["--out", "/proc/kdscale-no/tokens"], "/proc/kdscale-no"),
        "non-UTF-8 config file": (["data", "--config", str(tmp / "bad.yaml")], "not UTF-8"),
        "non-UTF-8 recipe": (["run", str(tmp / "recipe.yaml")], "not UTF-8"),
        "non-UTF-8 .jsonl input": (data[:2] + [str(tmp / "docs.jsonl")] + data[3:]
                                   + ["--out", str(tmp / "t")], "docs.jsonl:2: not UTF-8"),
        "control character in --set": (data + ["--out", str(tmp / "t"), "--set",
                                               "data.text_field=\x07"], "not valid YAML"),
        "bad CLI number": (["train", "--steps", "many"], "invalid int value"),
        "unknown command": (["trian"], "invalid choice"),
        "eval --max-samples -1": (["eval", str(run), "--data", str(tokens), "--max-samples", "-1"],
                                  "--max-samples: -1 is below 1"),
        "eval --micro-batch 0": (["eval", str(run), "--data", str(tokens), "--micro-batch", "0"],
                                 "--micro-batch: 0 is below 1"),
        "eval --tensor 0": (["eval", str(run), "--data", str(tokens), "--tensor", "0"],
                            "--tensor: 0 is below 1"),
        "inspect-cache --samples -1": (["inspect-cache", str(tmp), "--samples", "-1"],
                                       "--samples: -1 is below 0"),
        "teacher device cuda without CUDA": (cache + ["--out", str(tmp / "c1"), "--set",
                                                      "cache.teacher.device=cuda:0"],
                                             "no CUDA device"),
        "teacher device not a device": (cache + ["--out", str(tmp / "c2"), "--set",
                                                 "cache.teacher.device=banana"],
                                        "not a torch device"),
        "codec k above the vocabulary": (cache + ["--out", str(tmp / "c3"), "--set",
                                                  "cache.codec.k=100000"],
                                         "cache.codec.k=100000 exceeds the vocabulary"),
        "damaged safetensors": (["import-hf", str(tmp / "hf"), str(tmp / "imported")],
                                "not a readable safetensors file"),
        "non-finite number": (["train", "--tokens", str(tokens), "--out", str(tmp / "s"),
                               *STUDENT, "--set", "loss.kd_weight=.nan"], "finite number"),
    }  # fmt: skip


CASES = sorted(_cases(Path("/x"), Path("/x"), Path("/x"), Path("/x")))


@pytest.fixture(scope="module")
def cases(module_tmp_path, tiny_tokens_dir, tiny_teacher_dir, tiny_run_dir):
    tmp = module_tmp_path
    _make_files(tmp, tiny_teacher_dir)
    return tmp, _cases(tmp, tiny_tokens_dir, tiny_teacher_dir, tiny_run_dir)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(cases, capsys, case):
    tmp, table = cases
    argv, expected = table[case]
    status, _, err = run_cli(capsys, *argv)
    assert_one_line_error(status, err, expected)
    for name in ("c1", "c2", "c3", "t", "s", "imported"):  # nothing written, nothing locked
        assert not (tmp / name).exists(), name


def _unshare_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return shutil.which("unshare") is not None and probe.returncode == 0


_RUN_ALL = """
import contextlib, io, json, sys
from pathlib import Path
from kdscale.cli import main
commands, full = json.loads(sys.argv[1]), Path(sys.argv[2])
results = {}
for name, argv in commands.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    results[name] = [status, err.getvalue()]
left = sorted(str(p.relative_to(full)) for p in full.rglob("*"))
print("RESULTS " + json.dumps({"results": results, "left": left}))
"""


@pytest.mark.skipif(not _unshare_available(), reason="needs unshare (user + mount namespaces)")
def test_a_full_disk_is_one_line_in_data_train_and_cache(
    tmp_path, tiny_tokens_dir, tiny_teacher_dir
):
    full = tmp_path / "full"
    full.mkdir()
    commands = {
        "data": ["data", "--input", "stdlib:python/json", "--tokenizer", str(tiny_teacher_dir),
                 "--seq-len", "32", "--out", str(full / "tokens")],
        "train": ["train", "--tokens", str(tiny_tokens_dir), "--out", str(full / "run"),
                  "--steps", "1", *STUDENT],
        "cache": ["cache", "--tokens", str(tiny_tokens_dir), "--out", str(full / "cache"),
                  "--teacher", str(tiny_teacher_dir), "--set", "cache.ray.num_cpus=2",
                  "--set", "wandb.enabled=false"],
    }  # fmt: skip
    script = f'mount -t tmpfs -o size=256k tmpfs {full} && exec "$0" -c "$1" "$2" "$3"'
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, sys.executable, _RUN_ALL, json.dumps(commands),
         str(full)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    found = json.loads(line[8:])
    for name, (status, err) in found["results"].items():
        assert_one_line_error(status, err, "no space left on device")
    left = found["left"]  # what the full disk still held: nothing half-written, no lock
    assert not [p for p in left if p.startswith("tokens") or p.startswith(".")], left
    assert not [p for p in left if p.endswith(".lock") or p.endswith(".tmp")], left


def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding ``directory``'s kdscale lock (as a running command does)."""
    code = ("import sys; from pathlib import Path; from kdscale.locks import exclusive_directory\n"
            f"with exclusive_directory(Path({str(directory)!r}), 'x', 'x'):\n"
            "    print('held', flush=True); sys.stdin.read()")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("command", ["train", "run", "cache", "data"])
def test_a_second_writer_of_a_directory_is_refused(
    tmp_path, tiny_tokens_dir, tiny_teacher_dir, capsys, command
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"recipe: {{out: {tmp_path / 'r'}, stages: [data]}}\n"
                      f"data: {{inputs: [stdlib:python/json/tool.py], out: {tmp_path / 'tokens'}}}\n")
    argv, locked = {
        "train": (["train", "--tokens", str(tiny_tokens_dir), "--out", str(tmp_path / "run"),
                   *STUDENT], tmp_path / "run"),
        "run": (["run", str(recipe)], tmp_path / "r" / ".kdscale-run"),
        "cache": (["cache", "--tokens", str(tiny_tokens_dir), "--out", str(tmp_path / "c"),
                   "--teacher", str(tiny_teacher_dir)], tmp_path / "c"),
        "data": (["data", "--input", "stdlib:python/json/tool.py", "--tokenizer",
                  str(tiny_teacher_dir), "--seq-len", "32", "--out", str(tmp_path / "d")],
                 tmp_path / "d"),
    }[command]  # fmt: skip
    holder = _hold_lock(locked)
    try:
        status, _, err = run_cli(capsys, *argv)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert_one_line_error(status, err, "is in use by another", "(held by pid")
    assert not (locked / ".lock").exists()  # the holder removed it when it finished
    if command == "train":
        assert not list(locked.glob("checkpoints/step_*"))
