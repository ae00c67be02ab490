"""Starting or joining Ray, and sizing the workers from what the cluster has."""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

from distributed_influence.cluster.compat import LOCAL_SYSTEM_CONFIG, live_node_addresses, use_loopback

log = logging.getLogger(__name__)

#: The logger of Ray's notice "Token authentication is enabled for this Ray cluster".
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
#: Bound on finding out that a cluster address does not answer (TCP, then one GCS request).
PROBE_SECONDS = 15.0


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None,
              num_gpus: Optional[int] = None, runtime_env: Optional[dict] = None) -> bool:
    """Joins the cluster at ``address`` (or ``RAY_ADDRESS``), else starts Ray in-process.

    A local instance is bound to loopback with no dashboard; Ray's token authentication stays
    as Ray configures it (on by default). If Ray is already initialised in this process (a test
    session, a notebook) that instance is used as it is.

    Args:
        address: a cluster to join (``host:port``, ``ray://...``, ``auto``); None: ``RAY_ADDRESS``,
            else a new local instance.
        num_cpus, num_gpus: a new local instance's resources (Ray's defaults if None).
        runtime_env: Ray's runtime environment for this driver's workers (a new local instance
            only), e.g. a ``worker_process_setup_hook``.

    Returns:
        True when this call started or joined Ray (and the caller should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from distributed_influence.store.storage import redact

        log.info("joining the Ray cluster at %s", redact(address))
        join_cluster(address)
    else:
        use_loopback()
        # Ray's default for a new local instance is token authentication, kept as it is; only its
        # notice that it did so is not shown (a warning line on stderr would break the "one line
        # per bad input" contract of the command line).
        logging.getLogger(_TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
        # address="local": always a new instance, never a cluster some earlier `ray start`
        # left running on this machine (whose token and resources are not ours).
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False, _system_config=LOCAL_SYSTEM_CONFIG,
                 runtime_env=runtime_env)
        log.info("started a local Ray instance on 127.0.0.1")
    return True


def stop_ray() -> None:
    """Shuts Ray down after :func:`start_ray` started or joined it. A joined cluster is only
    disconnected from: its processes are not this one's."""
    import ray

    ray.shutdown()


def _host_port(address: str) -> Optional[Tuple[str, int]]:
    """(host, port) of a ``host:port`` address; None for ``auto``, ``ray://...`` and the like."""
    if "://" in address or address in ("auto", "local"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def probe_cluster(host: str, port: int, timeout: float = PROBE_SECONDS) -> list:
    """The addresses the nodes of the cluster at host:port advertise, asked of its GCS.

    Two steps, each bounded in time, because ``ray.init`` retries an address that does not
    answer for minutes: a TCP connection (refused or silent: nothing listens there), then one
    request to the GCS (no answer: something else listens there).

    Raises:
        ConfigError: nothing answers at host:port, or it is not a Ray cluster's GCS.
    """
    import socket

    from distributed_influence.errors import ConfigError

    where = f"--address {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout / 3):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: no Ray cluster answers there ({exc.strerror or exc}); "
                          f"give the head's GCS address (the --port of `ray start --head`)") from None
    try:
        nodes = live_node_addresses(f"{host}:{port}", timeout)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where}: not a Ray cluster's GCS ({why}); give the head's GCS address "
                          f"(the --port of `ray start --head`)") from None
    if not nodes:
        raise ConfigError(f"{where}: the Ray cluster there has no live node")
    return nodes


def join_cluster(address: str) -> None:
    """Joins a running cluster, failing within ~PROBE_SECONDS with one line if there is none.

    Ray canonicalises ``127.0.0.1:PORT`` to the machine's network address and then retries
    the GCS there for minutes; against a head started with ``--node-ip-address=127.0.0.1``
    (every service on loopback) that never succeeds. So a loopback address is probed first,
    and when the cluster's nodes advertise loopback the driver stays on loopback too.

    Raises:
        ConfigError: nothing (or no Ray cluster) answers at ``address``, or Ray refuses to join.
    """
    import ray

    from distributed_influence.errors import ConfigError

    parsed = _host_port(address)
    if parsed is not None:
        host, port = parsed
        nodes = probe_cluster(host, port)
        if _is_loopback(host) and any(_is_loopback(n) for n in nodes):
            use_loopback()
            address = f"127.0.0.1:{port}"
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        ray.shutdown()
        raise ConfigError(f"--address {address}: cannot join the Ray cluster "
                          f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None


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
            from distributed_influence.errors import ConfigError

            raise ConfigError(
                f"--gpus-per-worker {gpus_per_worker:g} but the cluster has {total_gpus:g} GPUs"
            )
        capacity = int(total_gpus // gpus_per_worker)
    else:
        capacity = max(1, int(total_cpus))
    if workers is not None and workers > capacity:
        from distributed_influence.errors import ConfigError

        raise ConfigError(f"--workers {workers} but the cluster has room for {capacity} "
                          f"({total_cpus:g} CPUs, {total_gpus:g} GPUs)")
    n = workers or capacity
    if n_shards is not None:
        n = min(n, n_shards)
    return max(1, n), float(gpus_per_worker), 1.0
