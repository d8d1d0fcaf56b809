"""Ray nodes for end-to-end tests: a cluster of several nodes on one machine, on 127.0.0.1.

The head is `ray start --head --block`, as docs/CLUSTER.md starts it, with
free ports, token authentication (a token of the test's own) and a short --temp-dir
(Unix socket paths must stay below 107 characters). A further node is a raylet with
its own object store joined to it (`add_node`: this module's __main__, since `ray
start --address` refuses a cluster kept on 127.0.0.1). Each runs in a process group
of its own: `stop_node` ends it cleanly, `kill_node` SIGKILLs it and every process
under it at once, a node failing as a machine would. `ray stop` is never used: it
stops every Ray process of the user on the machine.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    """Distinct ports free on 127.0.0.1 right now (all held open until each is picked)."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def short_temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


def ray_env(token_file: Path, **extra: str) -> dict:
    """The environment of every Ray process and `ray` command of a test cluster."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # Binds every Ray process (and the job's driver, which inherits it) to 127.0.0.1.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # A token of this test's own, not ~/.ray/auth_token.
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
        # Stop at once on SIGTERM instead of draining the node for up to 30 s.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        **extra,
    )
    return env


def new_token(temp_dir: Path) -> Path:
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    return token_file


def start_head(temp_dir: Path, env: dict, num_cpus: float) -> dict:
    """`ray start --head --block` on 127.0.0.1; returns {"process", "gcs", "url", "headers", "log"}
    once its dashboard (and job API) answers."""
    (gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics,
     autoscaler_metrics, dashboard_metrics) = free_ports(9)
    env = {**env, "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
           "DASHBOARD_METRIC_PORT": str(dashboard_metrics)}
    log_path = temp_dir / "ray_head.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent),
             "--metrics-export-port", str(metrics), "--num-cpus", f"{num_cpus:g}",
             "--object-store-memory", str(200 * 2**20), "--min-worker-port", "0", "--max-worker-port", "0",
             "--temp-dir", str(temp_dir), "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    headers = {"Authorization": f"Bearer {Path(env['RAY_AUTH_TOKEN_PATH']).read_text()}"}
    head = {"process": process, "gcs": f"127.0.0.1:{gcs}", "url": url, "headers": headers, "log": log_path}
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"ray start --head failed:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            stop_node(process)
            raise RuntimeError(f"the Ray head did not answer in 120 s:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/api/version", headers=headers, timeout=2).ok:
                return head
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


def add_node(head: dict, temp_dir: Path, env: dict, num_cpus: float) -> dict:
    """A second node: a raylet with its own object store and ports, joined to the head; returns
    {"process", "node_id", "log"} once the head lists it alive.

    `ray start --address` refuses to join a cluster whose nodes stay on 127.0.0.1
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and without that flag Ray binds every port of
    the node to all interfaces; so this module's own __main__ starts it, as `ray start`
    does but on 127.0.0.1.
    """
    wait_for_head_node(head)
    # Ray gives a new raylet a fixed 30 s to register with the GCS; a loaded machine can miss
    # that, and then the node gives up: start it again (its processes killed first).
    for attempt in range(1, 4):
        node = _start_node(head, temp_dir, env, num_cpus, temp_dir / f"ray_node.{attempt}.log")
        if node is not None:
            return node
    raise RuntimeError(f"the second node did not register in time, 3 tries:\n{(temp_dir / 'ray_node.3.log').read_text()[-4000:]}")


def _start_node(head: dict, temp_dir: Path, env: dict, num_cpus: float, log_path: Path) -> dict | None:
    """One try of add_node: the node, or None when it timed out registering."""
    agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(4)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--gcs", head["gcs"], "--num-cpus", f"{num_cpus:g}",
             "--temp-dir", str(temp_dir), "--ports", *map(str, (agent_http, agent_grpc, runtime_env_agent, metrics))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        text = log_path.read_text()
        if process.poll() is not None:
            kill_tree(process)
            if "timed out during startup" in text:
                return None
            raise RuntimeError(f"the second node failed to start:\n{text[-4000:]}")
        # Its own id (the line _run_node prints), not any other node that might be alive.
        joined = [line.split()[1] for line in text.splitlines() if line.startswith("node ") and " joined " in line]
        if joined and joined[0] in {n["node_id"] for n in alive_nodes(head)}:
            return {"process": process, "node_id": joined[0], "log": log_path}
        if time.monotonic() > deadline:
            stop_node(process)
            raise RuntimeError(f"the second node did not join in 180 s:\n{text[-4000:]}")
        time.sleep(0.5)


def wait_for_head_node(head: dict, timeout_s: float = 60) -> str:
    """The head node's id, once the head lists itself alive."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        heads = [n["node_id"] for n in alive_nodes(head) if n["is_head_node"]]
        if heads:
            return heads[0]
        time.sleep(0.5)
    raise RuntimeError(f"the head node did not list itself alive in {timeout_s} s")


def alive_nodes(head: dict) -> list[dict]:
    """The head's list of alive nodes (Ray's state API): node_id, is_head_node, resources_total, ..."""
    response = requests.get(f"{head['url']}/api/v0/nodes", params={"detail": "1", "limit": "100"},
                            headers=head["headers"], timeout=30)
    response.raise_for_status()
    return [n for n in response.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def stop_node(process: subprocess.Popen) -> None:
    """SIGTERM makes the node's launcher (`ray start --block`, or this module's) stop what it
    started; SIGKILL to whatever of it is left is the backstop."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    kill_tree(process)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once (Ray's workers set process groups
    of their own, so the launcher's group alone would miss them)."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=10)
    psutil.wait_procs(tree, timeout=10)


def kill_node(node: dict) -> None:
    """The node fails at once: SIGKILL to its raylet, object store, agents and workers alike."""
    kill_tree(node["process"])


def _run_node(argv=None) -> None:
    """A worker node on 127.0.0.1, joined to --gcs, until SIGTERM (what `ray start --address
    --block` does, less its refusal of a loopback cluster)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--gcs", required=True)
    parser.add_argument("--num-cpus", type=float, required=True)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--ports", nargs=4, type=int, required=True)
    args = parser.parse_args(argv)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray writes the address of "the" cluster under its default temp dir; keep it in ours.
    os.environ["RAY_TMPDIR"] = args.temp_dir
    import ray._private.node
    import ray._private.parameter

    agent_http, agent_grpc, runtime_env_agent, metrics = args.ports
    params = ray._private.parameter.RayParams(
        gcs_address=args.gcs, node_ip_address="127.0.0.1", num_cpus=args.num_cpus, num_gpus=0,
        object_store_memory=200 * 2**20, temp_dir=args.temp_dir, node_manager_port=0, object_manager_port=0,
        min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=agent_http, metrics_agent_port=agent_grpc,
        runtime_env_agent_port=runtime_env_agent, metrics_export_port=metrics)
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"node {node.node_id} joined {args.gcs}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # atexit: the node stops its processes
    while True:
        time.sleep(1)


if __name__ == "__main__":
    _run_node()
