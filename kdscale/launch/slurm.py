"""Render sbatch scripts from the packaged templates, submit them, and follow their state.

    spec = SlurmSpec(job_name="kd", nodes=2, gpus_per_node=8, time="04:00:00")
    script = render_script("torchrun", spec, job_command("recipe.yaml", "train"))
    job_id = submit_script(script, Path("runs/slurm/kd.sbatch"))
    status = wait_job(job_id)            # polls scontrol, not `sbatch --wait`

Every script is preemption-safe: ``--requeue`` and ``--signal=B:USR1@N``; the batch shell traps
USR1, sends SIGTERM to the job step (which checkpoints and exits) and requeues the job, whose
rerun resumes. State comes from ``scontrol show job`` (no accounting database needed).

Nothing rendered can become a command: every value is refused if it holds a control character
(a newline would start a new script line); ``#SBATCH`` values may not hold whitespace, quotes or
backslashes; the python path must be a plain path (it also names ``ray`` beside it); arguments
are shell-quoted. Job variables (``SlurmSpec.env``) are never written into the script: they go
to ``sbatch``'s own environment (``--export=ALL``), so a secret stays out of files. Scripts are
written 0600.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text

TEMPLATES = ("single", "torchrun", "ray")
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
     "BOOT_FAIL", "DEADLINE"}
)
# minutes | MM:SS | HH:MM:SS | D-HH | D-HH:MM | D-HH:MM:SS (sbatch --time)
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_VALUE = re.compile(r"[^\s\"'\\]+")  # one #SBATCH token: no whitespace, quotes, backslash
_PLAIN_PATH = re.compile(r"[\w@%+=:,./-]+", re.ASCII)  # needs no quoting in any shell context
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class JobCommand:
    """What a job runs: ``python ARGS``; ``args`` start with ``-m`` so torchrun can take them."""

    python: str
    args: tuple[str, ...]

    def shell(self) -> str:
        """The command as one shell-quoted line."""
        return shlex.join([self.python, *self.args])


def job_command(recipe: str, stage: str, overrides: tuple[str, ...] = (), python: str = "python") -> JobCommand:
    """The kdscale command a job runs: ``kdscale run RECIPE`` or one stage of ``recipe``."""
    sets = [arg for text in overrides for arg in ("--set", text)]
    source = (recipe,) if stage == "run" else ("--config", recipe)
    return JobCommand(python, ("-m", "kdscale.cli", stage, *source, *sets))


@dataclass(frozen=True)
class SlurmSpec:
    """The allocation a job asks for, and where its log goes."""

    job_name: str
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    signal_seconds: int = 300
    workdir: str = "."
    output: str = "%x-%j.out"
    env: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()


def time_limit_seconds(text: str) -> int:
    """Seconds in an sbatch ``--time`` value; a one-line error for anything else."""
    match = _TIME_RE.match(text.strip())
    if not match or text.strip() in {"0"}:
        raise KDScaleError(
            f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (not 0)"
        )
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    if b is not None:
        return a * 60 + b
    return a * 60


def validate_spec(spec: SlurmSpec) -> None:
    """Reject an allocation SLURM would refuse or that could never be preempted safely."""
    if spec.nodes < 1:
        raise KDScaleError(f"--nodes {spec.nodes}: must be >= 1")
    if spec.gpus_per_node < 0:
        raise KDScaleError(f"--gpus-per-node {spec.gpus_per_node}: must be >= 0")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise KDScaleError(f"--cpus-per-task {spec.cpus_per_task}: must be >= 1")
    if spec.signal_seconds < 1:
        raise KDScaleError(f"--signal-seconds {spec.signal_seconds}: must be >= 1")
    if spec.time is not None and time_limit_seconds(spec.time) <= spec.signal_seconds:
        raise KDScaleError(
            f"--time {spec.time!r} is not longer than --signal-seconds {spec.signal_seconds}: "
            "the job would be signalled before it starts working"
        )
    for key in spec.env:
        if not _ENV_NAME.fullmatch(key):
            raise KDScaleError(f"--env {key!r}: not a valid environment variable name")
    sbatch_values = {
        "--job-name": spec.job_name, "--partition": spec.partition, "--time": spec.time,
        "--account": spec.account, "--log-dir": spec.output, "the working directory": spec.workdir,
    }  # fmt: skip
    for flag, value in sbatch_values.items():
        if value is not None:
            _check_sbatch_value(flag, value)
    for option in spec.extra:
        _check_sbatch_value("--sbatch", option)
        if not option.startswith("-"):
            raise KDScaleError(f"--sbatch {option!r}: expected an sbatch option, e.g. --exclusive")


def _refuse_control(flag: str, value: str) -> None:
    found = _CONTROL.search(value)
    if found:
        raise KDScaleError(
            f"{flag} {value!r}: holds a control character ({found.group()!r}); refusing to put it "
            "into a job script"
        )


def _check_sbatch_value(flag: str, value: str) -> None:
    _refuse_control(flag, value)
    if not _SBATCH_VALUE.fullmatch(value):
        raise KDScaleError(
            f"{flag} {value!r}: an #SBATCH value must be non-empty, without whitespace, quotes "
            "or backslashes (run from, and log to, such paths)"
        )


def validate_command(command: JobCommand) -> None:
    """Refuse a job command that cannot be rendered safely: a python that is not a plain path,
    an argument with a control character."""
    if not _PLAIN_PATH.fullmatch(command.python):
        raise KDScaleError(
            f"--python {command.python!r}: must be a plain path (letters, digits, _@%+=:,./-): "
            "the job script also runs `ray` from its directory"
        )
    for arg in command.args:
        _refuse_control("job argument", arg)


def env_comment(env: dict[str, str]) -> str:
    """What the script says about the job's ``--env`` variables: their names, never values."""
    if not env:
        return ""
    return ("# kdscale submit --env (in sbatch's environment, not written here): "
            + " ".join(sorted(env)))


def sbatch_lines(spec: SlurmSpec) -> list[str]:
    """The ``#SBATCH`` header of a job (one task per node: a launcher starts the ranks)."""
    opts = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
        f"--chdir={spec.workdir}",
        f"--output={spec.output}",
        "--requeue",
        f"--signal=B:USR1@{spec.signal_seconds}",
        "--open-mode=append",  # a requeued run appends to the same log
    ]
    optional = {
        "--gpus-per-node": spec.gpus_per_node or None,
        "--cpus-per-task": spec.cpus_per_task,
        "--partition": spec.partition,
        "--time": spec.time,
        "--account": spec.account,
    }
    opts += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    opts += list(spec.extra)
    return [f"#SBATCH {opt}" for opt in opts]


def _template(name: str) -> str:
    if name not in TEMPLATES and name != "preemption":
        raise KDScaleError(f"--template {name!r}: expected one of {', '.join(TEMPLATES)}")
    suffix = ".sh" if name == "preemption" else ".sbatch"
    return (resources.files("kdscale") / "launch_templates" / f"{name}{suffix}").read_text()


def _fill(text: str, values: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return _PLACEHOLDER.sub(sub, text)


def render_script(template: str, spec: SlurmSpec, command: JobCommand) -> str:
    """The batch script for ``command`` on ``spec``'s allocation, from a packaged template."""
    validate_spec(spec)
    validate_command(command)
    body = _template(template)
    values = {
        "sbatch": "\n".join(sbatch_lines(spec)),
        "env": env_comment(spec.env),
        "preemption": _fill(_template("preemption"), {"signal_seconds": str(spec.signal_seconds)}).rstrip(),
        "command": command.shell(),
        "module_command": shlex.join(command.args),
        "python": shlex.quote(command.python),
        "ray": str(Path(command.python).parent / "ray"),
        "procs_per_node": str(max(spec.gpus_per_node, 1)),
        "gpus_per_node": str(spec.gpus_per_node),
    }
    return _fill(body, values)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    except FileNotFoundError:
        raise KDScaleError(f"{cmd[0]}: not found on PATH (is this a SLURM login node?)") from None


def partition_size(partition: str | None) -> tuple[str, int] | None:
    """``(name, nodes)`` of ``partition``, or of the default one when None (``sinfo``); None when
    sinfo knows no such partition (sbatch then says so)."""
    proc = _run(["sinfo", "-h", "-o", "%P %D"])  # one line per partition and node state
    if proc.returncode != 0:
        raise KDScaleError(f"sinfo failed: {' '.join(proc.stderr.split()) or f'exit status {proc.returncode}'}")
    sizes: dict[str, int] = {}
    default = None
    for line in proc.stdout.splitlines():
        name, count = line.split()
        if name.endswith("*"):
            name = default = name[:-1]
        sizes[name] = sizes.get(name, 0) + int(count)
    name = partition or default
    return (name, sizes[name]) if name in sizes else None


def check_nodes(nodes: int, partition: str | None) -> None:
    """Refuse more nodes than the partition has (without EnforcePartLimits the job would pend forever)."""
    size = partition_size(partition)
    if size is not None and nodes > size[1]:
        raise KDScaleError(f"--nodes {nodes}: partition {size[0]} has {size[1]} nodes")


def submit_script(script: str, path: Path, env: dict[str, str] | None = None) -> str:
    """Write ``script`` to ``path`` (0600), submit it with ``sbatch`` and return the job id.
    ``env``: job variables, handed to ``sbatch``'s environment (``--export=ALL``), not the file."""
    atomic_write_text(path, script, mode=0o600)
    proc = _run(["sbatch", "--parsable", "--export=ALL", str(path)], dict(os.environ) | (env or {}))
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise KDScaleError(f"sbatch {path} failed: {detail}")
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "ID" or "ID;CLUSTER"
    if not job_id.isdigit():
        raise KDScaleError(f"sbatch {path}: unexpected output {proc.stdout.strip()!r}")
    return job_id


@dataclass(frozen=True)
class JobStatus:
    """A job's state as ``scontrol show job`` reports it."""

    job_id: str
    state: str
    exit_code: int
    signal: int
    reason: str
    restarts: int

    @property
    def done(self) -> bool:
        """The job reached a final state (it may still be requeued if it was preempted)."""
        return self.state in FINAL_STATES


def _fields(text: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))


def job_status(job_id: str) -> JobStatus:
    """The state, exit code and reason of job ``job_id`` (finished jobs stay for MinJobAge)."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode != 0:
        raise KDScaleError(f"job {job_id}: {' '.join(proc.stderr.split()) or 'unknown to scontrol'}")
    f = _fields(proc.stdout)
    code, _, sig = f.get("ExitCode", "0:0").partition(":")
    return JobStatus(
        job_id=job_id,
        state=f.get("JobState", "UNKNOWN"),
        exit_code=int(code or 0),
        signal=int(sig or 0),
        reason=f.get("Reason", "None"),
        restarts=int(f.get("Restarts", "0")),
    )


def job_nodes(job_id: str) -> list[str]:
    """The hosts allocated to job ``job_id``, in order (the first runs the batch script)."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    node_list = _fields(proc.stdout).get("NodeList", "")
    if proc.returncode != 0 or node_list in ("", "(null)"):
        raise KDScaleError(f"job {job_id}: no nodes allocated")
    return _run(["scontrol", "show", "hostnames", node_list]).stdout.split()


def wait_job(job_id: str, timeout: float = 3600.0, poll: float = 0.2, states: frozenset[str] = FINAL_STATES) -> JobStatus:
    """Poll until job ``job_id`` is in one of ``states``; a one-line error after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        status = job_status(job_id)
        if status.state in states:
            return status
        if time.monotonic() > deadline:
            raise KDScaleError(f"job {job_id}: still {status.state} after {timeout:.0f} s")
        time.sleep(poll)


def cancel_job(job_id: str) -> None:
    """``scancel`` job ``job_id`` (its steps get SIGTERM, then SIGKILL after KillWait)."""
    proc = _run(["scancel", job_id])
    if proc.returncode != 0:
        raise KDScaleError(f"scancel {job_id} failed: {' '.join(proc.stderr.split())}")
