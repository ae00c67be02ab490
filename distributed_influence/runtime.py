"""Starting or joining Ray, and sizing the workers from what the cluster has."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Optional, Tuple

log = logging.getLogger(__name__)

# Ray has no public switch to keep an in-process node on loopback; this setting (read when Ray
# is imported, and by get_node_ip_address at call time) makes a local node advertise and bind
# 127.0.0.1 instead of the machine's network address.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: The logger of Ray's notice "Token authentication is enabled for this Ray cluster".
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
#: Largest call argument or result a local instance sends inside the call rather than through
#: its object store (Ray's ``max_direct_call_object_size``, 100 kB by default; set through
#: ``ray.init``'s ``_system_config``, which Ray documents as experimental). The head fit's
#: sums come back as (d+1) × C float64, 128 kB for the Fashion-MNIST CNN's head, ~50 times per
#: fit: measured with two actors on the 2-core benchmark machine, a round trip returning 128 kB
#: took 5.9–7.8 ms through the object store and 2.9–4.5 ms inside the call. A cluster keeps the
#: setting its head was started with.
DIRECT_CALL_BYTES = 256 * 1024
#: Ray's settings for a new local instance (``ray.init``'s ``_system_config``, which Ray
#: documents as experimental): large results inline (DIRECT_CALL_BYTES), and neither task events
#: nor metrics. Ray's processes report every task's state changes to the GCS, and their metrics
#: to the node's agent, every few seconds, for the dashboard, the state API, the timeline and
#: Prometheus; a local instance of the job serves no dashboard or state API and the job reads
#: none of them, while the driver's shutdown waits for the last reports. With two actors after
#: 50 calls, on the 2-core benchmark machine, the shutdown took 0.17–0.21 s in 4 of 5 runs
#: without them (0.45 s in one) against 0.42–0.50 s in 4 of 5 with them (0.20 s in one). A
#: cluster keeps the settings its head was started with.
LOCAL_SYSTEM_CONFIG = {"max_direct_call_object_size": DIRECT_CALL_BYTES,
                       "task_events_report_interval_ms": 0, "enable_metrics_collection": False}
#: A live node's state in the GCS's node table (Ray's GcsNodeInfo.GcsNodeState.ALIVE).
_ALIVE = 0
#: Bound on finding out that a cluster address does not answer (TCP, then one GCS request).
PROBE_SECONDS = 15.0


def use_loopback() -> None:
    """Makes Ray nodes started from this process bind and advertise 127.0.0.1 only."""
    os.environ[_LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as rc

    if not hasattr(rc, "ENABLE_RAY_CLUSTER"):
        log.warning("this Ray version has no ENABLE_RAY_CLUSTER switch: a local run may bind to "
                    "the machine's network address instead of 127.0.0.1")
    rc.ENABLE_RAY_CLUSTER = False


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None,
              num_gpus: Optional[int] = None, while_waiting: Optional[Callable[[], None]] = None) -> bool:
    """Joins the cluster at ``address`` (or ``RAY_ADDRESS``), else starts Ray in-process.

    A local instance is bound to loopback with no dashboard; Ray's token authentication stays
    as Ray configures it (on by default). If Ray is already initialised in this process (a test
    session, a notebook) that instance is used as it is.

    Args:
        address: a cluster to join (``host:port``, ``ray://...``, ``auto``); None: ``RAY_ADDRESS``,
            else a new local instance.
        num_cpus, num_gpus: a new local instance's resources (Ray's defaults if None).
        while_waiting: called once (it should return at once, e.g. start a thread) when this
            process has nothing to do but wait: for a new local instance, once Ray's processes
            are launched and only their start-up is awaited (~2 s on the 2-core benchmark
            machine), so that work started there does not hold up the Python work of Ray's
            start (its imports, launching the processes), which shares this process's GIL;
            before joining a cluster, or at once when Ray is up already. Should it raise, the
            error is logged and Ray's start goes on.

    Returns:
        True when this call started or joined Ray (and the caller should shut it down).
    """
    import ray

    waiting = _once(while_waiting)
    if ray.is_initialized():
        waiting()
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from .storage import redact

        log.info("joining the Ray cluster at %s", redact(address))
        waiting()
        join_cluster(address)
    else:
        use_loopback()
        # Ray's default for a new local instance is token authentication, kept as it is; only its
        # notice that it did so is not shown (a warning line on stderr would break the "one line
        # per bad input" contract of the command line).
        logging.getLogger(_TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
        # address="local": always a new instance, never a cluster some earlier `ray start`
        # left running on this machine (whose token and resources are not ours).
        with _quick_local_start(waiting):
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     log_to_driver=True, configure_logging=False,
                     _system_config=LOCAL_SYSTEM_CONFIG)
        log.info("started a local Ray instance on 127.0.0.1")
    waiting()  # if Ray's internals did not call it
    return True


def _once(fn: Optional[Callable[[], None]]) -> Callable[[], None]:
    """``fn`` to be called at most once, from whichever point of Ray's start comes first; its
    errors are logged, not raised: it runs inside Ray's start, which must not stop half-way."""
    called = []

    def call():
        if fn is not None and not called:
            called.append(True)
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - see above
                log.warning("while starting Ray: %s", exc)

    return call


@contextlib.contextmanager
def _quick_local_start(while_waiting: Callable[[], None] = lambda: None):
    """Skips what Ray's start of a local instance does that a local run has no use for.

    Measured on the project's 2-core benchmark machine (``ray.init`` alone, alternating runs):

    - With ``include_dashboard=False`` Ray still starts its API server, serving only usage
      statistics (no dashboard, no job or state API), and polls until it is up: 1.1 s of a
      core, and an init of 4.4–6.3 s against 2.3–3.5 s without it. A local run asks nothing of
      it; Ray Jobs and the state API are used on clusters started with ``ray start``, which this
      does not touch.
    - Ray then waits for the new raylet to register by asking the GCS once a second: 0.4–1.0 s
      after it had registered. Asked every 20 ms, the wait ends when the registration does.
    - Ray starts its autoscaler monitor, a Python process that imports much of Ray and then
      polls the GCS for as long as the instance lives, to scale a cluster: a local instance has
      no nodes to add. Per-process CPU accounting over the full Fashion-MNIST audit: 0.50–0.76 s
      of a core per run, most of it while the workers import TensorFlow (see also
      :func:`stop_ray`, which stops one still running).

    ``while_waiting`` is called when that wait begins.

    Ray has no public switch for any of them; should its internals differ, the start is Ray's
    own.
    """
    try:
        import ray._private.services as services
        from ray._private.node import Node

        start_api_server, get_node = Node.start_api_server, services.get_node
        start_monitor = Node.start_monitor
    except (ImportError, AttributeError):
        start_api_server = None
    if start_api_server is None:  # (outside the except: Ray's own errors chain to nothing here)
        yield
        return

    def no_api_server(self, *args, include_dashboard=None, **kwargs):
        if include_dashboard:  # asked for: Ray's own start
            return start_api_server(self, *args, include_dashboard=include_dashboard, **kwargs)
        log.debug("Ray's API server not started: no dashboard was asked for")
        return None

    def registered_node(*args, **kwargs):
        # Ray calls get_node(gcs_address, node_id); any other call is passed on as it is.
        if len(args) == 2 and not kwargs:
            while_waiting()
            _await_registration(*args)
        return get_node(*args, **kwargs)

    def no_monitor(self, *args, **kwargs):
        log.debug("Ray's autoscaler monitor not started: a local instance has nothing to scale")

    # (owner, attribute, Ray's own, ours): each replaced for the start, each restored after it.
    patches = [(Node, "start_api_server", start_api_server, no_api_server),
               (services, "get_node", get_node, registered_node),
               (Node, "start_monitor", start_monitor, no_monitor)]
    for owner, name, _, ours in patches:
        setattr(owner, name, ours)
    try:
        yield
    finally:
        for owner, name, rays, _ in patches:
            setattr(owner, name, rays)


def _await_registration(gcs_address: str, node_id: str, timeout: float = 10.0,
                        every: float = 0.02) -> None:
    """Returns once the GCS at ``gcs_address`` lists node ``node_id`` (hex) alive, or after
    ``timeout`` seconds, or at the first error: Ray's own wait (its own 30 s) comes next in
    every case, so a raylet that never registers is reported at most ``timeout`` later."""
    import time

    try:
        from ray._raylet import GcsClient

        client = GcsClient(address=gcs_address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = client.get_all_node_info(timeout=every * 50)
            if any(getattr(k, "hex", lambda: k)() == node_id and v.state == _ALIVE for k, v in infos.items()):
                return
            time.sleep(every)
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.debug("could not follow the raylet's registration: %s", exc)


def stop_ray() -> None:
    """Shuts Ray down after :func:`start_ray` started or joined it.

    A local instance's autoscaler monitor, should one run (:func:`_quick_local_start` starts
    none), is stopped first, and at once. Ray stops it after the GCS, and its SIGTERM handler
    then keeps trying to report to the gone GCS until Ray kills it after a one-second grace:
    1.0 s of a 1.1 s shutdown on the project's 2-core benchmark machine. A local instance has
    nothing to scale, so nothing is lost. Ray has no public switch for this; should its
    internals differ, the shutdown is Ray's own. A joined cluster is only disconnected from:
    its processes are not this one's.
    """
    import ray

    try:
        import ray._private.ray_constants as rc
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        if node is not None and node.head and rc.PROCESS_TYPE_MONITOR in node.all_processes:
            node.kill_monitor(check_alive=False)
    except Exception as exc:  # noqa: BLE001 - an optimisation only: Ray's shutdown follows
        log.debug("could not stop Ray's autoscaler monitor first: %s", exc)
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
    import threading

    from .errors import ConfigError

    where = f"--address {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout / 3):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: no Ray cluster answers there ({exc.strerror or exc}); "
                          f"give the head's GCS address (the --port of `ray start --head`)") from None
    found: dict = {}

    def ask():
        try:
            from ray._raylet import GcsClient

            infos = GcsClient(address=f"{host}:{port}").get_all_node_info(timeout=timeout / 2)
            found["nodes"] = [i.node_manager_address for i in infos.values() if i.state == _ALIVE]
        except Exception as exc:  # noqa: BLE001 - reported below as one line
            found["error"] = exc

    thread = threading.Thread(target=ask, daemon=True)  # the GCS client may block past its timeout
    thread.start()
    thread.join(timeout)
    if "nodes" not in found:
        why = str(found["error"]).splitlines()[0] if "error" in found else f"no answer within {timeout:g} s"
        raise ConfigError(f"{where}: not a Ray cluster's GCS ({why}); give the head's GCS address "
                          f"(the --port of `ray start --head`)")
    if not found["nodes"]:
        raise ConfigError(f"{where}: the Ray cluster there has no live node")
    return found["nodes"]


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

    from .errors import ConfigError

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
