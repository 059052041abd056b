"""Teachers on Ray: each teacher is a group of ``tensor × pipeline`` actors ("ranks").

    groups = place_groups(cache)            # placement groups; refuses what no node can hold
    described = start_groups(groups, cache) # actors created, process groups formed, teachers loaded
    ...  group.submit(task) / group.reform(cache) after a rank died ...
    close_groups(groups)

Placement: teachers of one rank each (the default) share one ``SPREAD`` placement group, one
bundle per actor, spread over the nodes. A larger group gets a ``STRICT_PACK`` placement group
of its own (one node); before anything starts, a group that needs more CPUs or GPUs than any
alive node has is refused in one line naming the resource, the need and the node sizes.
Both wait at most ``cache.ray.timeout_s`` for room.

Formation: rank 0 reports its node's address and a free port; every rank joins a
``torch.distributed`` group of the group's size there (gloo on CPU, nccl on GPU) and builds the
teacher at ``tensor × pipeline`` (:class:`~kdscale.teacher.megatron.MegatronTeacher`). Actors are
never restarted by Ray: when any rank dies the driver kills the rest of its group, creates and
forms it again (a new port) and retries its shard, up to ``cache.ray.max_restarts`` times per
group. One path for every group size.

Test hook: with ``KDSCALE_TEST_KILL_RANK_ONCE=DIR`` in the actors' environment and a file
``DIR/arm`` present, rank 1 of a group SIGKILLs itself when handed a shard, once (``DIR/fired``
is created first, exclusively).
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from kdscale.cache.manifest import CacheShardRecord
from kdscale.cache.writer import ShardTask
from kdscale.config.cache import CacheConfig
from kdscale.errors import KDScaleError
from kdscale.logging import get_logger

log = get_logger(__name__)

KILL_HOOK_ENV = "KDSCALE_TEST_KILL_RANK_ONCE"


class CacheWorker:
    """A Ray actor: one rank of one teacher, many shards. (Wrapped with ``ray.remote`` at launch.)"""

    def __init__(self, cache: dict[str, Any], num_threads: int):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.cfg = CacheConfig.model_validate(cache)
        self.rank = 0
        self.teacher: Any = None

    def address(self) -> tuple[str, int]:
        """This node's address and a free TCP port on it: where the group meets (rank 0)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, master: str, port: int, rank: int, size: int) -> dict[str, Any]:
        """Join the group (``size`` > 1), load this rank's teacher; its fingerprint and vocabulary."""
        from kdscale.teacher import build_teacher

        self.rank = rank
        if size > 1:  # read by kdscale.models.parallel, as a launcher's environment
            os.environ.update(
                MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                LOCAL_RANK="0",  # Ray shows each actor only its own GPU
            )  # fmt: skip
        self.teacher = build_teacher(self.cfg.teacher)
        return {"fingerprint": self.teacher.fingerprint(), "vocab_size": self.teacher.vocab_size}

    def process(self, task: ShardTask) -> CacheShardRecord | None:
        """This rank's part of one cache shard: the writing rank commits it and returns its
        record, the others return None."""
        from kdscale.cache.writer import write_cache_shard

        hook = os.environ.get(KILL_HOOK_ENV)
        if hook and self.rank == 1 and os.path.exists(os.path.join(hook, "arm")):
            try:
                os.close(os.open(os.path.join(hook, "fired"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return write_cache_shard(task, self.teacher, self.cfg)


@dataclass
class TeacherGroup:
    """One teacher: its placement, the actors of its ranks, and what it is working on."""

    index: int
    placement: Any
    bundles: list[int]
    ranks: list[Any] = field(default_factory=list)
    restarts: int = 0
    task: ShardTask | None = None
    waiting: set[Any] = field(default_factory=set)
    record: CacheShardRecord | None = None

    def submit(self, task: ShardTask) -> list[Any]:
        """Hand ``task`` to every rank; the refs to wait on."""
        self.task, self.record = task, None
        self.waiting = {rank.process.remote(task) for rank in self.ranks}
        return list(self.waiting)

    def kill(self) -> None:
        """End every actor of the group (a dead one included)."""
        import ray

        for actor in self.ranks:
            ray.kill(actor, no_restart=True)
        self.ranks, self.waiting = [], set()


def _bundle(cache: CacheConfig) -> dict[str, float]:
    gpus = cache.ray.gpus_per_actor
    return {"CPU": cache.ray.cpus_per_actor} | ({"GPU": gpus} if gpus else {})


def _refuse_unplaceable(cache: CacheConfig) -> None:
    """One line when a group needs more of a resource than any alive node has in total."""
    import ray

    teacher, size = cache.teacher, cache.teacher.group_size
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for resource, each in _bundle(cache).items():
        need = size * each
        if all(node.get(resource, 0.0) < need for node in nodes):
            sizes = ", ".join(f"{node.get(resource, 0.0):g}" for node in nodes)
            raise KDScaleError(
                f"cache.teacher: a group of tensor_parallel x pipeline_parallel = "
                f"{teacher.tensor_parallel}x{teacher.pipeline_parallel} = {size} actors needs "
                f"{need:g} {resource} on one node ({each:g} per actor), but no node has that many "
                f"(nodes' {resource}: {sizes}); lower the group size or the {resource} per actor"
            )


def place_groups(cache: CacheConfig) -> list[TeacherGroup]:
    """Placement for ``cache.ray.actors`` teachers (see the module docstring); a one-line error
    when a group can never fit a node, or the cluster has no room within ``cache.ray.timeout_s``."""
    import ray
    from ray.util.placement_group import placement_group

    bundle, size, count = _bundle(cache), cache.teacher.group_size, cache.ray.actors
    if size == 1:
        shared = placement_group([bundle] * count, strategy="SPREAD")
        groups = [TeacherGroup(i, shared, [i]) for i in range(count)]
        what = f"{count} actors of {bundle}"
    else:
        _refuse_unplaceable(cache)
        groups = [
            TeacherGroup(i, placement_group([bundle] * size, strategy="STRICT_PACK"), list(range(size)))
            for i in range(count)
        ]
        what = f"{count} teacher groups of {size} actors of {bundle}"
    try:
        ray.get([g.placement.ready() for g in {id(g.placement): g for g in groups}.values()],
                timeout=cache.ray.timeout_s)  # fmt: skip
    except ray.exceptions.GetTimeoutError:
        nodes = sum(node["Alive"] for node in ray.nodes())
        cpus_gpus = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        close_groups(groups)
        raise KDScaleError(
            f"cache.ray: {what} found no room within {cache.ray.timeout_s:.0f} s "
            f"on a cluster of {nodes} nodes with {cpus_gpus} (a host that never joined?); "
            "lower cache.ray.actors or the resources per actor, or raise cache.ray.timeout_s"
        ) from None
    return groups


def _launch(group: TeacherGroup, cache: CacheConfig) -> list[Any]:
    """Create the group's actors and start forming it; the refs of every rank's ``init``."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(num_cpus=cache.ray.cpus_per_actor, num_gpus=cache.ray.gpus_per_actor,
                        max_restarts=0, max_task_retries=0)(CacheWorker)  # fmt: skip
    body, threads = cache.model_dump(mode="json"), max(1, int(cache.ray.cpus_per_actor))
    group.ranks = [
        remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group.placement, placement_group_bundle_index=bundle)).remote(body, threads)
        for bundle in group.bundles
    ]  # fmt: skip
    size = len(group.ranks)
    master, port = ray.get(group.ranks[0].address.remote()) if size > 1 else ("", 0)
    return [actor.init.remote(master, port, rank, size) for rank, actor in enumerate(group.ranks)]


def group_failed(exc: Exception, group: TeacherGroup) -> bool:
    """Whether ``exc`` (from a rank of ``group``) means a rank died: the actor itself, or, in a
    group, a communication error on a survivor whose peer died. A KDScaleError or an OSError
    raised by the teacher is the run's error, not a death."""
    import ray

    if isinstance(exc, ray.exceptions.RayActorError):
        return True
    cause = getattr(exc, "cause", None)
    return (
        isinstance(exc, ray.exceptions.RayTaskError)
        and len(group.bundles) > 1
        and not isinstance(cause, (KDScaleError, OSError))
    )


def failure(exc: Exception, max_restarts: int, starting: bool = False) -> KDScaleError:
    """One line for a teacher actor that could not start (``starting``) or died for good."""
    if starting or getattr(exc, "actor_init_failed", False):
        text = str(exc)
        found = [line.split("KDScaleError: ", 1)[1] for line in text.splitlines() if "KDScaleError: " in line]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return KDScaleError(f"a teacher actor failed to start: {found[-1] if found else lines[-1]}")
    return KDScaleError(
        f"a teacher actor died and is out of restarts (cache.ray.max_restarts={max_restarts}); "
        "committed shards are kept: run the same command again to resume"
    )


def _count_restart(group: TeacherGroup, exc: Exception, cache: CacheConfig) -> None:
    """Kill what is left of ``group``; raise once it is out of restarts."""
    group.kill()
    group.restarts += 1
    limit = cache.ray.max_restarts
    if limit != -1 and group.restarts > limit:
        raise failure(exc, limit) from None
    log.warning("teacher %d: a rank died (%s); re-forming the group (restart %d)",
                group.index, type(exc).__name__, group.restarts)  # fmt: skip


def _start(group: TeacherGroup, cache: CacheConfig, refs: list[Any] | None = None) -> dict[str, Any]:
    """Launch the group (unless ``refs`` of its ranks' ``init`` are given) and wait for its ranks
    to load; re-form it while ranks die, within its restarts."""
    import ray

    while True:
        try:
            described = _get_fail_fast(refs or _launch(group, cache))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            if getattr(exc, "actor_init_failed", False) or not group_failed(exc, group):
                group.kill()
                raise failure(exc, cache.ray.max_restarts, starting=True) from None
            _count_restart(group, exc, cache)
            refs = None
            continue
        if any(d != described[0] for d in described[1:]):
            raise KDScaleError(f"teacher_fingerprint: the ranks of teacher {group.index} disagree: {described}")
        return described[0]


def _get_fail_fast(refs: list[Any]) -> list[Any]:
    """``ray.get(refs)``, raising the first error as soon as it arrives (a rank that failed to
    load would otherwise leave the driver waiting on a peer stuck in the rendezvous)."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


def start_groups(groups: list[TeacherGroup], cache: CacheConfig) -> list[dict[str, Any]]:
    """Create, form and load every group (loading all at once); each teacher's fingerprint and
    vocabulary."""
    import ray

    launched = []
    for group in groups:
        try:
            launched.append(_launch(group, cache))
        except ray.exceptions.RayActorError:  # rank 0 died already: _start re-forms the group
            launched.append(None)
    return [_start(group, cache, refs) for group, refs in zip(groups, launched)]


def reform(group: TeacherGroup, exc: Exception, cache: CacheConfig) -> None:
    """Replace a group one of whose ranks died: kill the rest, create and form it again."""
    import ray

    _count_restart(group, exc, cache)
    try:  # a lost node's bundles are placed elsewhere first
        ray.get(group.placement.ready(), timeout=cache.ray.timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise KDScaleError(
            f"cache.ray: teacher {group.index} found no room to re-form within "
            f"{cache.ray.timeout_s:.0f} s; raise cache.ray.timeout_s or add a node"
        ) from None
    _start(group, cache)


def close_groups(groups: list[TeacherGroup]) -> None:
    """Kill every actor and remove every placement group (an attached cluster keeps running)."""
    from ray.util.placement_group import remove_placement_group

    for group in groups:
        group.kill()
    for placement in {id(g.placement): g.placement for g in groups}.values():
        remove_placement_group(placement)
