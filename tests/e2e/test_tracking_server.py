"""The pipeline against a team's MLflow tracking server: PostgreSQL, proxied artifacts, basic auth.

The test starts what docs/TRACKING.md's "A tracking server for a team" runs: a PostgreSQL
server (Debian's postgresql: initdb and postgres in a temp directory, as an
unprivileged user, on 127.0.0.1 and a free port), and `mlflow server` on 127.0.0.1
with its backend store and its users in that database, artifacts proxied by the
server (`--serve-artifacts`: clients send files over HTTP and never see the
artifact directory) and the basic-auth app. A request without credentials is
refused; the admin creates a user for the pipeline, and the train, evaluate and
register stages run with MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD in their environment (the Ray workers the train stage
starts inherit them). Everything is then read back through the server's REST API:
the run with its params, metrics and artifacts, the registered version and its alias.
"""
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from support.project_copy import copy_project
from support.ray_nodes import free_ports

from pipelines.core.params import load_params
from support.training import WIDTH, write_shards

COPIED = ["pipelines", "fcn_models"]
ITERATIONS = 4
API = "/api/2.0/mlflow"
DB_USER = "mlflow"
ADMIN = "admin"
TRAINER = "trainer"


def postgres_bin() -> Path:
    """The newest PostgreSQL server's binaries (Debian installs them under /usr/lib/postgresql/<version>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        message = "no PostgreSQL server: install it (apt-get install postgresql; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(found[-1]).parent


def unprivileged() -> dict:
    """Popen arguments that run a process as `nobody` when this one is root (PostgreSQL refuses
    to run as root); none otherwise."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("nobody")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def wait_until(check, what: str, process: subprocess.Popen, log: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, OSError):
            pass
        if process.poll() is not None:
            raise AssertionError(f"{what} exited:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not answer in {timeout_s} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of the test's own: its URI base (postgresql://user:password@127.0.0.1:port)."""
    import psycopg

    bin_dir = postgres_bin()
    # Not under pytest's tmp dir: the unprivileged user must reach it.
    root = Path(tempfile.mkdtemp(prefix="fcnpg-"))
    run_as = unprivileged()
    password = secrets.token_hex(16)
    (root / "password").write_text(password)
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
        os.chown(root / "password", run_as["user"], run_as["group"])
    data, log_path = root / "data", root / "postgres.log"
    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=scram-sha-256",
                    f"--pwfile={root / 'password'}", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=180, **run_as)
    (port,) = free_ports(1)
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1", "-c", f"port={port}",
             "-c", f"unix_socket_directories={root}", "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **run_as)
    base = f"postgresql://{DB_USER}:{password}@127.0.0.1:{port}"
    try:
        connection = wait_until(lambda: _connect(psycopg, f"{base}/postgres"), "postgres", server, log_path)
        with connection:
            connection.execute("CREATE DATABASE mlflow")
            connection.execute("CREATE DATABASE mlflow_auth")
        yield {"base": base, "password": password}
    finally:
        stop(server, signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


def _connect(psycopg, dsn: str):
    try:
        return psycopg.connect(dsn, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError:
        return None


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    """`mlflow server` on 127.0.0.1: backend store and users in PostgreSQL, proxied artifacts, basic auth."""
    work = tmp_path_factory.mktemp("mlflow-server")
    artifacts = work / "artifacts"
    admin_password = secrets.token_urlsafe(16)
    config = work / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {postgres['base']}/mlflow_auth\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    config.chmod(0o600)
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"{postgres['base']}/mlflow", "--serve-artifacts",
             "--artifacts-destination", str(artifacts), "--app-name", "basic-auth", "--workers", "1"],
            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # Any answer will do: with basic auth on, even /health wants credentials.
        wait_until(lambda: requests.get(f"{url}/health", timeout=5).status_code in (200, 401), "mlflow server",
                   server, log_path)
        yield {"url": url, "admin": (ADMIN, admin_password), "artifacts": artifacts, "log": log_path}
    finally:
        stop(server)


def api(server: dict, method: str, path: str, auth, **kwargs) -> requests.Response:
    return requests.request(method, f"{server['url']}{API}{path}", auth=auth, timeout=60, **kwargs)


def make_project(project: Path) -> Path:
    copy_project(project, COPIED)
    write_shards(project / "data" / "shards")
    params = {
        "data": {"shards_dir": "data/shards"},
        "model": {"width": WIDTH, "imagenet_weights": None},
        "train": {"loss": "mean", "val_every": 2, "log_every": 2,
                  "stages": {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": ITERATIONS}}},
        "ray": {"num_workers": 1, "cpus_per_worker": 1.0, "data_cpus": 0.5, "max_failures": 0},
        "evaluate": {"stages": ["fcn32s"], "timing_images": 1},
        "mlflow": {"register_stage": "fcn32s", "val_images_logged": 1},
    }
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    load_params(params_file)
    return params_file


def run_stage(project: Path, env: dict, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", *args, "--params", str(project / "params.yaml")], cwd=project,
                            env=env, capture_output=True, text=True, timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return output


def test_refuses_requests_without_credentials(tracking_server):
    body = {"max_results": 10}
    assert api(tracking_server, "POST", "/experiments/search", None, json=body).status_code == 401
    wrong = (ADMIN, "not-the-password")
    assert api(tracking_server, "POST", "/experiments/search", wrong, json=body).status_code == 401
    assert api(tracking_server, "POST", "/experiments/search", tracking_server["admin"], json=body).ok


def test_pipeline_trains_evaluates_and_registers_through_the_server(tracking_server, tmp_path):
    server, admin = tracking_server, tracking_server["admin"]
    # The admin makes an account for the pipeline; everything after runs as that user.
    trainer = (TRAINER, secrets.token_urlsafe(16))
    created = api(server, "POST", "/users/create", admin, json={"username": trainer[0], "password": trainer[1]})
    assert created.ok, created.text

    project = tmp_path / "project"
    params = load_params(make_project(project))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(MLFLOW_TRACKING_URI=server["url"], MLFLOW_TRACKING_USERNAME=trainer[0],
               MLFLOW_TRACKING_PASSWORD=trainer[1], RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    train_log = run_stage(project, env, "pipelines.stages.train", "--stage", "fcn32s")
    assert f"at {server['url']}" in train_log, train_log[-3000:]
    run_stage(project, env, "pipelines.stages.evaluate")
    run_stage(project, env, "pipelines.stages.register")
    # Nothing of MLflow's was written into the project: no SQLite store, no artifact directory.
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

    # The experiment, its one run, its params and metrics, read back as the pipeline's user.
    experiment = api(server, "GET", "/experiments/get-by-name", trainer,
                     params={"experiment_name": params.mlflow.experiment}).json()["experiment"]
    # Artifacts go through the server: the experiment's artifact root is the proxy's.
    assert experiment["artifact_location"].startswith("mlflow-artifacts:/"), experiment
    runs = api(server, "POST", "/runs/search", trainer,
               json={"experiment_ids": [experiment["experiment_id"]], "max_results": 50}).json()["runs"]
    by_stage = {}
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_stage.setdefault(tags.get("fcn.stage"), []).append(run)
    assert len(by_stage["fcn32s"]) == 1
    run = by_stage["fcn32s"][0]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    # The experiment is the pipeline user's: the auth app gave its creator MANAGE.
    permission = requests.get(f"{server['url']}/api/3.0/mlflow/users/permissions/get", auth=admin, timeout=60,
                              params={"username": TRAINER, "resource_type": "experiment",
                                      "resource_id": experiment["experiment_id"]})
    assert permission.ok and permission.json()["permission"] == "MANAGE", permission.text
    logged_params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert logged_params["stage.iterations"] == str(ITERATIONS) and logged_params["model.width"] == str(WIDTH)
    metrics = json.loads((project / "reports" / "fcn32s" / "metrics.json").read_text())
    history = api(server, "GET", "/metrics/get-history", trainer,
                  params={"run_id": run_id, "metric_key": "mean_iu"}).json()["metrics"]
    assert sorted(m["step"] for m in history) == [2, 4]
    assert max(m["value"] for m in history) == pytest.approx(metrics["mean_iu"], abs=1e-9)
    evaluation = json.loads((project / "reports" / "evaluation.json").read_text())
    run_metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert run_metrics["eval/mean_iu"] == pytest.approx(evaluation["fcn32s"]["mean_iu"], abs=1e-9)

    # The run's artifacts, listed and downloaded through the server, are the stage's files,
    # and they sit in the server's artifact directory, put there by the server.
    listed = api(server, "GET", "/artifacts/list", trainer, params={"run_id": run_id, "path": "outputs"}).json()
    assert sorted(f["path"] for f in listed["files"]) == ["outputs/history.csv", "outputs/metrics.json"]
    run_root = run["info"]["artifact_uri"]
    assert run_root.startswith("mlflow-artifacts:/"), run_root
    relative = run_root[len("mlflow-artifacts:/"):].lstrip("/")
    download = requests.get(f"{server['url']}/api/2.0/mlflow-artifacts/artifacts/{relative}/outputs/metrics.json",
                            auth=trainer, timeout=60)
    assert download.ok and json.loads(download.content) == metrics
    stored = server["artifacts"] / relative
    assert json.loads((stored / "outputs" / "metrics.json").read_text()) == metrics
    assert (stored / "plots" / "confusion_matrix.png").stat().st_size > 0
    # Without credentials, no artifact either.
    assert requests.get(f"{server['url']}/api/2.0/mlflow-artifacts/artifacts/{relative}/outputs/metrics.json",
                        timeout=60).status_code == 401

    # The registered model: version 1 from the training run, holding the alias.
    registry = json.loads((project / "reports" / "registry.json").read_text())
    assert registry["decision"] == "promoted" and registry["run_id"] == run_id
    model = api(server, "GET", "/registered-models/get", trainer,
                params={"name": params.mlflow.model_name}).json()["registered_model"]
    assert {a["alias"]: a["version"] for a in model.get("aliases", [])} == {params.mlflow.alias: "1"}
    champion = api(server, "GET", "/registered-models/alias", trainer,
                   params={"name": params.mlflow.model_name, "alias": params.mlflow.alias}).json()["model_version"]
    assert champion["version"] == "1" and champion["run_id"] == run_id
    tags = {t["key"]: t["value"] for t in champion.get("tags", [])}
    assert float(tags["mean_iu"]) == pytest.approx(evaluation["fcn32s"]["mean_iu"], abs=1e-9)

    # Another user of the team reads by default (default_permission READ) but cannot write to this run.
    reader = ("reader", secrets.token_urlsafe(16))
    assert api(server, "POST", "/users/create", admin, json={"username": reader[0], "password": reader[1]}).ok
    assert api(server, "GET", "/runs/get", reader, params={"run_id": run_id}).ok
    refused = api(server, "POST", "/runs/log-metric", reader,
                  json={"run_id": run_id, "key": "mean_iu", "value": 1.0, "timestamp": 0, "step": 99})
    assert refused.status_code == 403, refused.text
