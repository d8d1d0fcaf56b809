"""Latency of the served model (`fcn serve`: MLflow's scoring server) beside the model's own forward time.

    .venv/bin/python bench/bench_serve.py             # prints the table, updates docs/BENCHMARKS.md
    .venv/bin/python bench/bench_serve.py --no-write

The registered model's pyfunc (pipelines/serve/pyfunc_model.py, fcn_models as its code, an FCN-8s
checkpoint of random weights) is saved as an MLflow model and served the way `fcn
serve` serves it (the same command and environment: pipelines.track.mlflow_cli), one
worker on 127.0.0.1. 20 requests (after 2 warm-ups) post one VOC-sized uint8 image as
JSON, one at a time; latency is the time from sending to the decoded mask, the
payload encoded beforehand. The forward time is FCNSegmenter.segment on the same
image in this process (20 calls after a warm-up), what the server runs inside each
request; the rest is JSON and HTTP.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdoc import publish  # noqa: E402

from fcn_models.checkpoint import save_checkpoint  # noqa: E402
from fcn_models.fcn import build_fcn  # noqa: E402
from fcn_models.summary import machine  # noqa: E402
from pipelines.registry.publish import FCN_MODELS_DIR, SERVING_CODE, model_signature  # noqa: E402
from pipelines.serve.pyfunc_model import CHECKPOINT_ARTIFACT, FCNSegmenter  # noqa: E402
from pipelines.serve.scoring_app import server_command, server_env  # noqa: E402

SECTION = "## Serving latency (bench/bench_serve.py)"
BENCH_NAME = "bench_serve"


def checkpoint(directory: Path, width: float) -> Path:
    torch.manual_seed(0)
    model = build_fcn("fcn8s", width=width)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("score"):
                param.normal_(0, 0.5)  # masks of several classes, as a trained net gives
    return save_checkpoint(directory, model)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(width: float, image: np.ndarray, requests_n: int) -> dict:
    import mlflow
    import requests

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        scratch = Path(scratch)
        ckpt = checkpoint(scratch / "ckpt", width)
        mlflow.pyfunc.save_model(str(scratch / "model"), python_model=str(SERVING_CODE),
                                 code_paths=[str(FCN_MODELS_DIR)], artifacts={CHECKPOINT_ARTIFACT: str(ckpt)},
                                 signature=model_signature())
        segmenter = FCNSegmenter().load(ckpt, device="cpu")
        segmenter.segment(image)
        forward = []
        for _ in range(requests_n):
            start = time.perf_counter()
            expected = segmenter.segment(image)
            forward.append(time.perf_counter() - start)
        port = free_port()
        log = open(scratch / "serve.log", "w")
        server = subprocess.Popen(server_command("127.0.0.1", port, 1),
                                  env=server_env("", str(scratch / "model")), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{(scratch / 'serve.log').read_text()[-3000:]}")
                try:
                    if requests.get(f"{url}/ping", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(1)
            payload = json.dumps({"inputs": image.tolist()})
            latency = []
            for i in range(requests_n + 2):
                start = time.perf_counter()
                response = requests.post(f"{url}/invocations", data=payload,
                                         headers={"Content-Type": "application/json"}, timeout=300)
                mask = np.asarray(response.json()["predictions"], dtype=np.uint8)
                if i >= 2:
                    latency.append(time.perf_counter() - start)
            if not np.array_equal(mask, expected):
                raise SystemExit("the served mask differs from FCNSegmenter.segment's")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
            log.close()
    return {"width": width, "forward_median": statistics.median(forward), "latency_median": statistics.median(latency),
            "latency_p95": percentile(latency, 95), "payload_mb": len(payload) / 1e6}


def format_report(rows, size, requests_n) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}; one server worker on 127.0.0.1.",
        f"FCN-8s on VGG16, one {size[1]}x{size[0]} uint8 RGB image per request ({{\"inputs\": ...}} JSON, "
        f"{rows[0]['payload_mb']:.1f} MB), {requests_n} requests after 2 warm-ups, one at a time.",
        "",
        "| width | forward ms (median) | latency ms (median) | latency ms (p95) | latency / forward |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['width']} | {r['forward_median'] * 1000:.0f} | {r['latency_median'] * 1000:.0f} | "
                     f"{r['latency_p95'] * 1000:.0f} | {r['latency_median'] / r['forward_median']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.125, 1.0])
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    rows = []
    for width in args.widths:
        rows.append(measure(width, image, args.requests))
        print(rows[-1], flush=True)
    report = format_report(rows, (args.height, args.width), args.requests)
    publish(SECTION, BENCH_NAME, report, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
