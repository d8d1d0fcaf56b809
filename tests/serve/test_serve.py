"""`fcn serve`: MLflow's scoring server over a registered version, on 127.0.0.1, against real requests.

The server is started as a user starts it, from a shell whose PATH lacks this
environment's bin directory (where `uvicorn` is): the stage puts it first itself.
Masks of two images of different sizes must equal `fcn predict`'s; inputs that are not
one RGB uint8 image get a 400 whose message says what to send.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from pipelines.commands import predict
from pipelines.core.params import parse_params
from pipelines.stages import register as register_stage
from support.checkpoints import make_checkpoint, write_evaluation
from support.ports import free_port
from support.servers import wait_for_ping
from support.training import WIDTH, write_shards


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A project with one registered version, and `fcn serve` running over it."""
    root = tmp_path_factory.mktemp("served")
    write_shards(root / "data" / "shards", n_train=2, n_val=2)
    (root / "params.yaml").write_text(yaml.safe_dump({"model": {"width": WIDTH}}))
    scores = make_checkpoint(root / "models" / "fcn8s", seed=6, mean_iu=0.6)
    write_evaluation(parse_params({}, root=root), "fcn8s", root / "models" / "fcn8s", scores)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert register_stage.main(["--params", str(root / "params.yaml")]) == 0
    port = free_port()
    # A PATH without this environment's bin: what made `mlflow models serve` fail with "uvicorn: not found".
    env["PATH"] = "/usr/bin:/bin"
    log = open(root / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.commands.serve", "--params", str(root / "params.yaml"), "--port", str(port)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(server, url, root / "serve.log")
        yield {"root": root, "url": url}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


def post(url: str, payload) -> requests.Response:
    return requests.post(f"{url}/invocations", data=json.dumps(payload),
                         headers={"Content-Type": "application/json"}, timeout=120)


def test_served_masks_equal_fcn_predicts_at_two_sizes(served, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rng = np.random.default_rng(4)
    files = []
    for name, size in (("small", (31, 45)), ("large", (90, 67))):
        files.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(files[-1])
    assert predict.main([*map(str, files), "--out", str(tmp_path / "out"),
                         "--params", str(served["root"] / "params.yaml")]) == 0
    for file in files:
        image = np.asarray(Image.open(file).convert("RGB"))
        response = post(served["url"], {"inputs": image.tolist()})
        assert response.status_code == 200, response.text[-2000:]
        mask = np.array(response.json()["predictions"], dtype=np.uint8)
        expected = np.asarray(Image.open(tmp_path / "out" / f"{file.stem}_mask.png"))
        assert mask.shape == image.shape[:2]
        assert len(np.unique(expected)) >= 2
        np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("make, says", [
    (lambda rng: rng.random((20, 24, 3)), "float pixels"),
    (lambda rng: rng.integers(0, 256, (20, 24, 4)), "4 channels"),
    (lambda rng: rng.integers(0, 256, (20, 24)), "grayscale"),
    (lambda rng: rng.integers(0, 256, (2, 20, 24, 3)), "batch of 2 images"),
    (lambda rng: rng.integers(0, 300, (20, 24, 3)) + 100, "outside 0..255"),
])
def test_what_is_not_one_rgb_uint8_image_gets_a_400_saying_what_to_send(served, make, says):
    response = post(served["url"], {"inputs": make(np.random.default_rng(0)).tolist()})
    assert response.status_code == 400, response.text[-2000:]
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert says in body["message"] and "uint8 pixel values 0..255" in body["message"]
