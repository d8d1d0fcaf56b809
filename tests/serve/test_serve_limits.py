"""`fcn serve` under hostile requests: a body past the model's limit is refused with a 413 before
it is read, the server keeps answering, and SIGTERM stops every process it started.

The server runs under an address-space limit: what its imports take plus a margin
that reading and parsing a 5000 x 5000 JSON image (the old behaviour) passes.
"""
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys

import pytest
import requests
import yaml

from fcn_models.limits import MAX_PIXELS, json_body_limit
from pipelines.core.params import parse_params
from pipelines.stages import register as register_stage
from support.checkpoints import make_checkpoint, write_evaluation
from support.ports import free_port
from support.process_trees import descendants, kill_all, port_free, wait_gone
from support.servers import wait_for_ping
from support.training import WIDTH, write_shards

MARGIN = 1536 * 2**20
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
SIDE = 5000


def imported_size() -> int:
    """Peak address space of a Python that has imported what the scoring server imports."""
    out = subprocess.run([sys.executable, "-c", "import torch, uvicorn, fastapi, mlflow.pyfunc.scoring_server; "
                          "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])"],
                         capture_output=True, text=True, check=True, env={**os.environ, **ENV}, timeout=300)
    return int(out.stdout.strip()) * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served_limits")
    write_shards(root / "data" / "shards", n_train=2, n_val=2)
    (root / "params.yaml").write_text(yaml.safe_dump({"model": {"width": WIDTH}}))
    scores = make_checkpoint(root / "models" / "fcn8s", seed=6, mean_iu=0.6)
    write_evaluation(parse_params({}, root=root), "fcn8s", root / "models" / "fcn8s", scores)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert register_stage.main(["--params", str(root / "params.yaml")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    address_space = imported_size() + MARGIN

    def bounded():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    port = free_port()
    log = open(root / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.commands.serve", "--params", str(root / "params.yaml"), "--port", str(port)],
        cwd=root, env={**env, **ENV}, stdout=log, stderr=subprocess.STDOUT, preexec_fn=bounded)
    url = f"http://127.0.0.1:{port}"
    started = []
    try:
        wait_for_ping(server, url, root / "serve.log")
        started += descendants(server.pid)
        yield {"root": root, "url": url, "port": port, "server": server, "started": started}
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        kill_all(started + descendants(server.pid))
        log.close()


def send_huge(port: int, chunked: bool) -> tuple[bytes, int, int]:
    """POST a SIDE x SIDE JSON image, stopping once the server answers; (answer, bytes sent, body size)."""
    row = ("[" + ", ".join(["[9, 9, 9]"] * SIDE) + "]").encode()
    body_size = len(b'{"inputs": [') + SIDE * (len(row) + 2) - 2 + len(b"]}")
    head = (f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {body_size}\r\n") + "\r\n").encode()

    def framed(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head)
        pieces = [b'{"inputs": ['] + [row + (b", " if i < SIDE - 1 else b"]}") for i in range(SIDE)]
        try:
            for piece in pieces:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered
                sock.sendall(framed(piece))
                sent += len(piece)
            else:
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer and b"}" in answer.split(b"\r\n\r\n", 1)[1]:
                    break
        except (ConnectionResetError, socket.timeout):
            pass
    return answer, sent, body_size


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_past_the_limit_gets_a_413_before_it_is_read(served, chunked):
    answer, sent, body_size = send_huge(served["port"], chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    message = json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]
    assert f"({json_body_limit(MAX_PIXELS)} bytes" in message and f"{MAX_PIXELS} pixels" in message
    assert sent < body_size
    # The server is still there and answers a small image.
    answer = requests.post(f"{served['url']}/invocations", data=json.dumps({"inputs": [[[1, 2, 3]] * 4] * 3}),
                           headers={"Content-Type": "application/json"}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 3


def test_sigterm_stops_every_process_fcn_serve_started(served):
    started = served["started"] + descendants(served["server"].pid)
    assert started
    served["server"].send_signal(signal.SIGTERM)
    served["server"].wait(timeout=60)
    assert wait_gone(started, 30) == []
    assert port_free(served["port"])
