"""Starting or joining Ray, and sizing the workers from what the cluster has."""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

log = logging.getLogger(__name__)

# Ray has no public switch to keep an in-process node on loopback; this setting (read when Ray
# is imported, and by get_node_ip_address at call time) makes a local node advertise and bind
# 127.0.0.1 instead of the machine's network address.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def use_loopback() -> None:
    """Makes Ray nodes started from this process bind and advertise 127.0.0.1 only."""
    os.environ[_LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as rc

    if not hasattr(rc, "ENABLE_RAY_CLUSTER"):
        log.warning("this Ray version has no ENABLE_RAY_CLUSTER switch: a local run may bind to "
                    "the machine's network address instead of 127.0.0.1")
    rc.ENABLE_RAY_CLUSTER = False


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None,
              num_gpus: Optional[int] = None) -> bool:
    """Joins the cluster at ``address`` (or ``RAY_ADDRESS``), else starts Ray in-process.

    A local instance is bound to loopback with no dashboard; Ray's token authentication stays
    as Ray configures it (on by default). If Ray is already initialised in this process (a test
    session, a notebook) that instance is used as it is.

    Returns:
        True when this call started or joined Ray (and the caller should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from .storage import redact

        log.info("joining the Ray cluster at %s", redact(address))
        ray.init(address=address, log_to_driver=True)
    else:
        use_loopback()
        # address="local": always a new instance, never a cluster some earlier `ray start`
        # left running on this machine (whose token and resources are not ours).
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        log.info("started a local Ray instance on 127.0.0.1")
    return True


def plan_workers(n_shards: Optional[int], workers: Optional[int],
                 gpus_per_worker: Optional[float]) -> Tuple[int, float, float]:
    """Decides the number of workers and each one's GPUs and CPUs from the cluster's resources.

    One worker per GPU when the cluster has GPUs (``gpus_per_worker`` defaults to 1 there),
    else one per CPU slot; never more workers than shards.

    Returns:
        (n_workers, gpus per worker, cpus per worker).
    """
    import ray

    res = ray.cluster_resources()
    total_gpus = float(res.get("GPU", 0.0))
    total_cpus = float(res.get("CPU", 1.0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if total_gpus >= 1 else 0.0
    if gpus_per_worker > 0:
        if total_gpus < gpus_per_worker:
            from .errors import ConfigError

            raise ConfigError(
                f"--gpus-per-worker {gpus_per_worker:g} but the cluster has {total_gpus:g} GPUs"
            )
        capacity = int(total_gpus // gpus_per_worker)
    else:
        capacity = max(1, int(total_cpus))
    if workers is not None and workers > capacity:
        from .errors import ConfigError

        raise ConfigError(f"--workers {workers} but the cluster has room for {capacity} "
                          f"({total_cpus:g} CPUs, {total_gpus:g} GPUs)")
    n = workers or capacity
    if n_shards is not None:
        n = min(n, n_shards)
    return max(1, n), float(gpus_per_worker), 1.0
