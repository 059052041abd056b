"""A Ray instance for one ``kdscale cache`` run on this machine, reachable over loopback only.

Ray 2.60 replaces a requested node address of 127.0.0.1 by the machine's routable address and
then listens there or on every interface (GCS, raylet, object manager, workers, dashboard and
runtime-env agents), with authentication off by default. Its single-machine mode (the one it
uses on macOS and Windows, chosen by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps the node on
127.0.0.1 instead, and every listener with it. :func:`loopback_only` turns that mode on for the
driver and the processes Ray starts, and :func:`check_loopback` refuses to go on if Ray picked
another address anyway. ``tests/test_integrity_ray.py`` lists the listening sockets of every
Ray process during a cache run.

Other users of the same machine can still reach loopback ports: on a shared login node set
``RAY_AUTH_MODE=token`` (Ray's token authentication; kdscale only defaults it to ``disabled``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator

from kdscale.errors import KDScaleError

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Ray's single-machine mode for the block (environment and, since Ray reads it once at
    import, the constant of an already imported Ray); both are restored afterwards."""
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = before_env


def check_loopback(address: str) -> None:
    """Refuse a local Ray node whose address is not a loopback one."""
    if not ipaddress.ip_address(address).is_loopback:
        raise KDScaleError(
            f"the local Ray instance runs on {address}, not on loopback: this Ray version "
            "ignores kdscale's request to stay on 127.0.0.1; refusing to start teachers "
            "reachable from the network (attach to a cluster with cache.ray.address instead)"
        )
