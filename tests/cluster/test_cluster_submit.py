"""The cluster path end to end: `ray start --head` on loopback, the job submitted through the
Ray Jobs API, tables checked, head stopped. Also: cluster.yaml against Ray's own schema."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from conftest import assert_same_results

pytestmark = pytest.mark.slow  # a Ray instance or cluster of its own: the inner loop skips it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin():
    cand = os.path.join(os.path.dirname(sys.executable), "ray")
    return cand if os.path.exists(cand) else shutil.which("ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head with token authentication, every service on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("head")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # A short private temp dir (Unix socket paths are limited to ~107 bytes) that names every
    # process of this head, so the teardown stops this head only, not other Ray instances.
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    subprocess.run(
        [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         # The job agent's HTTP port defaults to 52365: a second Ray instance on the machine
         # (another test run, a user's own head) would hold it and no job could be submitted.
         # Port 0 lets the agent bind a free port itself: a port picked here and released
         # could be taken by another process (Ray's own services included) before the agent
         # binds it, and an agent whose HTTP server fails never registers for jobs.
         "--dashboard-agent-listen-port=0",
         "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    try:
        yield {"env": env, "url": f"http://127.0.0.1:{dash}", "gcs": gcs, "temp_dir": temp_dir}
    finally:
        _stop_head(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(temp_dir: str, gcs_port: int) -> None:
    """Terminates the processes of this head: those naming its temp dir or GCS port."""
    import psutil  # in the test extra (Ray depends on it too)

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmd or f"--gcs_server_port={gcs_port}" in cmd or f"127.0.0.1:{gcs_port}" in cmd:
            if proc.pid != os.getpid():
                mine.append(proc)
    for proc in mine:
        proc.terminate()
    # Some of Ray's processes outlive SIGTERM by far (measured: the teardown took 20 s when it
    # waited that long); what is still running after a few seconds is killed.
    _, alive = psutil.wait_procs(mine, timeout=5)
    for proc in alive:
        proc.kill()


def _agent_log(head, lines: int = 30) -> str:
    """The end of the head's job-agent log: why a submission found no agent, if it did not."""
    path = os.path.join(head["temp_dir"], "session_latest", "logs", "dashboard_agent.log")
    try:
        with open(path, errors="replace") as fh:
            return "\n--- dashboard_agent.log ---\n" + "".join(fh.readlines()[-lines:])
    except OSError as e:
        return f"\n--- no dashboard_agent.log: {e} ---"


def _submit(cmd, env, wait: float = 120.0):
    """Submits, retrying while the head's job agent is still starting.

    `ray start` returns before the dashboard agent that accepts jobs has registered; on a
    loaded machine the first submission can meet "No available agent" (an HTTP 500). That is
    the head not being ready yet, not a failure of the job, so it is retried for a bounded time.
    """
    import time

    deadline = time.monotonic() + wait
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
        not_ready = "No available agent" in proc.stdout + proc.stderr
        if proc.returncode == 0 or not not_ready or time.monotonic() > deadline:
            return proc
        time.sleep(3)


def test_job_submitted_to_a_ray_head_succeeds(head, files, reference, tmp_path):
    """Exactly the README's cluster command: `ray job submit --working-dir . -- python jobs/audit.py`."""
    out = str(tmp_path / "out")
    cmd = [_ray_bin(), "job", "submit", "--address", head["url"], "--working-dir", ROOT,
           "--runtime-env-json", json.dumps({"excludes": [".git", "tests", "*.keras", "demo_out"]}),
           "--", sys.executable, "jobs/audit.py", "--model", files["model"], "--train", files["train"],
           "--test", files["test"], "--out", out, "--k", "4", "--shards", "3"]
    proc = _submit(cmd, head["env"])
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-3000:] + _agent_log(head)
    assert "succeeded" in logs.lower(), logs[-3000:] + _agent_log(head)
    assert "stage score: done" in logs  # the per-stage log lines a cluster user sees
    with open(os.path.join(out, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["workers"]["backend"] == "ray" and len(manifest["shards"]) == 3
    assert_same_results(reference, out)


def test_audit_joins_a_loopback_head_by_its_address(head, files, reference, tmp_path):
    """The README's local-cluster recipe: `--address 127.0.0.1:PORT` against a head started
    with `--node-ip-address=127.0.0.1` joins (Ray alone would rewrite the address to the
    machine's network address and retry there until the timeout below)."""
    out = str(tmp_path / "out")
    env = {k: v for k, v in head["env"].items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_influence.cli", "audit", "--model", files["model"],
         "--train", files["train"], "--test", files["test"], "--out", out, "--k", "4", "--shards", "2",
         "--address", f"127.0.0.1:{head['gcs']}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(os.path.join(out, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["workers"]["backend"] == "ray" and manifest["config"]["address"] == f"127.0.0.1:{head['gcs']}"
    assert_same_results(reference, out)


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    import yaml

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as fh:
        schema = json.load(fh)
    with open(os.path.join(ROOT, "cluster.yaml")) as fh:
        config = yaml.safe_load(fh)
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    # No port for the world: dashboard on loopback, our own security group on every node.
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)
    assert all("SecurityGroupIds" in t["node_config"] for t in types.values())
