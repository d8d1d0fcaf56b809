"""`fcn ui` stops every process it started on SIGTERM and on SIGINT: the MLflow server, its
uvicorn, job runner and huey consumers, none left holding the port."""
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml

from support.ports import free_port
from support.process_trees import descendants, kill_all, port_free, wait_gone


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_fcn_ui_stops_what_it_started(tmp_path, signum):
    from mlflow import MlflowClient

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({}))
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # the store, created
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    log = open(tmp_path / "ui.log", "w")
    ui = subprocess.Popen([sys.executable, "-m", "pipelines.commands.ui", "--params", str(tmp_path / "params.yaml"),
                           "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    started = []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        time.sleep(2)  # the job runner and its consumers start after the server answers
        started = descendants(ui.pid)
        assert started
        ui.send_signal(signum)
        ui.wait(timeout=60)
        assert wait_gone(started, 30) == [], [p.cmdline() for p in wait_gone(started, 0)]
        assert port_free(port)
    finally:
        if ui.poll() is None:
            ui.kill()
        kill_all(started + descendants(ui.pid))
        log.close()
