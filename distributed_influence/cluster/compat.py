"""What the job needs of Ray that Ray has no public API for, and nothing else.

Every touch of Ray's internals in the package lives here. None of Ray's functions is replaced:
one constant is set, one client is used, and a new local instance gets three of Ray's internal
settings, each for a behaviour that the job promises or relies on and that Ray's public API
cannot give today. The tests in ``tests/cluster/test_compat.py`` fail loudly, not vacuously,
when Ray moves any of them (Ray refuses to start with a setting it does not know).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

#: Largest call argument or result a local instance sends inside the call rather than through
#: its object store (Ray's ``max_direct_call_object_size``, 100 kB by default; set through
#: ``ray.init``'s ``_system_config``, which Ray documents as experimental). The head fit's sums
#: come back as (d+1) × C float64 many times per fit, and a round trip inside the call is about
#: half that of one through the object store. A cluster keeps the setting its head was started
#: with.
DIRECT_CALL_BYTES = 256 * 1024
#: Ray's settings for a new local instance (missing public API: ``ray.init``'s ``_system_config``
#: is documented as experimental, and its keys are Ray's internal config names): large results
#: inline (DIRECT_CALL_BYTES), and neither task events nor metrics, which feed the dashboard, the
#: state API and Prometheus, none of which a local run serves, and whose last reports the
#: driver's shutdown would wait for. A cluster keeps the settings its head was started with.
LOCAL_SYSTEM_CONFIG = {"max_direct_call_object_size": DIRECT_CALL_BYTES,
                       "task_events_report_interval_ms": 0, "enable_metrics_collection": False}
#: Read by Ray once, when ``ray._private.ray_constants`` is imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: A live node's state in the GCS's node table (Ray's ``GcsNodeInfo.GcsNodeState.ALIVE``).
ALIVE = 0


def use_loopback() -> None:
    """Makes Ray nodes started from this process bind and advertise 127.0.0.1 only.

    Missing public API: ``ray.init`` has no documented switch for the address a new local
    instance binds to (only the private ``_node_ip_address``), and ``ray start`` has
    ``--node-ip-address``. Ray's own "local only" mode, for Windows and macOS, is chosen by
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read into ``ray_constants.ENABLE_RAY_CLUSTER``
    when Ray is imported: the variable is set for a later import, and the constant for an
    import that already happened.

    Raises:
        RuntimeError: this Ray has no such constant any more (the local run would bind to the
            machine's network address: refused rather than done silently).
    """
    os.environ[LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as rc

    if not hasattr(rc, "ENABLE_RAY_CLUSTER"):
        raise RuntimeError("this Ray version has no ray_constants.ENABLE_RAY_CLUSTER: a local run cannot be "
                           "kept on 127.0.0.1 (see distributed_influence.cluster.compat)")
    rc.ENABLE_RAY_CLUSTER = False


def live_node_addresses(address: str, timeout: float) -> list:
    """The addresses that the live nodes of the cluster whose GCS is at ``address`` advertise.

    Missing public API: ``ray.init(address=...)`` retries an address that does not answer for
    minutes and has no timeout of its own; the only way to ask a GCS one bounded question before
    joining is Ray's internal GCS client.

    Args:
        address: ``host:port`` of the GCS.
        timeout: seconds for the whole question, answered or not.

    Raises:
        TimeoutError: no answer within ``timeout``.
        Exception: the client's own error (not a GCS, refused), passed on as it is.
    """
    found: dict = {}

    def ask():
        try:
            from ray._raylet import GcsClient

            infos = GcsClient(address=address).get_all_node_info(timeout=timeout / 2)
            found["nodes"] = [i.node_manager_address for i in infos.values() if i.state == ALIVE]
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            found["error"] = exc

    thread = threading.Thread(target=ask, daemon=True)  # the client may block past its timeout
    thread.start()
    thread.join(timeout)
    if "nodes" in found:
        return found["nodes"]
    if "error" in found:
        raise found["error"]
    raise TimeoutError(f"no answer within {timeout:g} s")
