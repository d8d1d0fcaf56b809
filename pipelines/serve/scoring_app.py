"""What `fcn serve` runs: MLflow's scoring server app in uvicorn, behind a request body limit.

    server_command(host, port, workers)   uvicorn with create_app, in this environment
    server_env(store, model)              its environment: the model URI, the store, this bin on PATH
    create_app()                          the app of one uvicorn worker (uvicorn --factory)
    BodyLimit(app, max_bytes, max_pixels) refuses a larger body with a 413, before reading it

MLflow's scoring server (mlflow.pyfunc.scoring_server, what `mlflow models serve` starts
in uvicorn) reads a whole request body and parses it before the model's pixel check
runs, and uvicorn has no body limit: one huge JSON image takes gigabytes. The limit is
fcn_models.limits.json_body_limit of the served model's own pixel limit: the largest
JSON an image the model takes can be. A body that declares more (Content-Length) is
refused before any of it is read; a chunked one as soon as it passes the limit.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fcn_models import limits

# The model URI a worker loads.
MODEL_ENV = "FCN_SERVE_MODEL"
APP = "pipelines.serve.scoring_app:create_app"


def server_command(host: str, port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--factory", APP, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def server_env(store: str, model: str) -> dict:
    """This environment's bin first on PATH, this checkout importable, the model resolved against `store`."""
    bin_dir = str(Path(sys.executable).parent)
    root = str(Path(__file__).resolve().parents[2])
    python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": python_path,
            "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store, MODEL_ENV: model}


class BodyLimit:
    """An ASGI app that passes on requests of at most max_bytes of body and answers larger ones 413."""

    def __init__(self, app, max_bytes: int, max_pixels: int):
        self.app, self.max_bytes, self.max_pixels = app, max_bytes, max_pixels

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(send, f"{int(declared)} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.refuse(send, f"more than {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def refuse(self, send, size: str) -> None:
        message = (f"request body of {size} is more than this server reads ({self.max_bytes} bytes, the JSON of "
                   f"an RGB image of {self.max_pixels} pixels, the model's limit): scale the image down first")
        content = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}).encode()
        # Connection: close, so that the server drops the rest of the body instead of reading it.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": content})


def create_app():
    """MLflow's scoring app over the model MODEL_ENV names, behind the model's body limit."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_ENV])
    try:
        max_pixels = int(getattr(model.unwrap_python_model(), "max_pixels", limits.MAX_PIXELS))
    except MlflowException:  # not a PythonModel: the library's limit
        max_pixels = limits.MAX_PIXELS
    return BodyLimit(scoring_server.init(model), limits.json_body_limit(max_pixels), max_pixels)
