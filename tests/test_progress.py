"""Progress lines in log files and a console without third-party warnings, seen from outside: real
`kdscale` processes with stderr redirected to a file, as under a batch scheduler or `> log 2>&1`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^(\d\d:\d\d:\d\d) INFO kdscale\.progress: (?P<desc>[\w ]+): "
    r"(?P<done>[\d,]+)/(?P<total>[\d,]+) "
    r"(?P<unit>\w+) \(\d+%\) \| (?P<rate>[\d,]+) tok/s \| elapsed [\d:]+ \| ETA [\d:?]+$"
)


def _run(args: list[str], log: Path, seconds: float) -> str:
    """Run ``args`` in a fresh process, stderr (and stdout) into ``log``; return the log."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["KDSCALE_PROGRESS_SECONDS"] = str(seconds)
    with open(log, "w") as handle:
        status = subprocess.run(args, env=env, cwd=REPO, stdout=handle, stderr=handle).returncode
    text = log.read_text()
    assert status == 0, text
    return text


def test_a_redirected_stage_logs_done_total_rate_and_eta_at_a_steady_interval(
    tmp_path: Path,
) -> None:
    # Six items of 0.3 s with a line every 0.25 s: lines arrive while an item is in flight, and
    # the counts they report only grow.
    script = (
        "import time\n"
        "from kdscale.logging import setup_logging\n"
        "from kdscale.progress import track\n"
        "setup_logging()\n"
        "for _ in track(range(6), 'scoring', unit='batch', tokens_of=lambda _: 512):\n"
        "    time.sleep(0.3)\n"
    )
    text = _run([sys.executable, "-c", script], tmp_path / "log.txt", seconds=0.25)
    lines = [LINE.match(line) for line in text.splitlines()]
    assert all(lines), text  # nothing but progress lines: no bar frames, no warnings
    done = [int(m["done"]) for m in lines]
    assert len(lines) >= 5 and done == sorted(done) and done[-1] == 6, text
    assert {m["desc"] for m in lines} == {"scoring"} and {m["total"] for m in lines} == {"6"}
    assert all(int(m["rate"].replace(",", "")) > 0 for m in lines[1:])
    times = [datetime.strptime(m[1], "%H:%M:%S") for m in lines]
    assert (times[-1] - times[0]).total_seconds() <= 4  # steady lines over a ~2 s run
    assert "ETA 00:00" in text.splitlines()[-1]  # the last line, at the end


def test_eval_of_a_hugging_face_directory_in_a_log_file(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_teacher_imported: Path, tiny_tokens_dir: Path
) -> None:
    # `kdscale eval` takes the same model names as every command (an HF directory here, imported
    # once by the fixture), writes progress lines into a redirected log, and no third-party
    # warning.
    args = [sys.executable, "-m", "kdscale.cli", "eval", str(tiny_teacher_dir), "--data",
            str(tiny_tokens_dir), "--micro-batch", "1", "--max-samples", "6"]  # fmt: skip
    text = _run(args, tmp_path / "eval.log", seconds=0.01)  # 6 tiny batches: ~0.06 s
    lines = text.splitlines()
    progress = [LINE.match(line) for line in lines if "kdscale.progress" in line]
    assert progress and all(progress), text
    assert {m["desc"] for m in progress} == {"evaluating"} and progress[-1]["done"] == "6"
    assert lines[-3].startswith("tokens evaluated: 192") and lines[-2].startswith("LM loss:")
    third_party = [
        line for line in lines
        if "Warning" in line or "[WARNING]" in line or line.lstrip().startswith("warnings.warn")
    ]  # fmt: skip
    assert third_party == []
