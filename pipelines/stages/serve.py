"""Serve: a registered model as a REST endpoint, MLflow's scoring server on 127.0.0.1.

    fcn serve [--model models:/fcn-voc@champion] [--port 5001] [--params params.yaml]

Runs `mlflow models serve -m MODEL --env-manager local` in this environment (its bin
directory first on PATH: the server starts `uvicorn` from there) against the tracking
store the params file names. POST one image to http://127.0.0.1:PORT/invocations as
JSON, {"inputs": [[[r, g, b], ...], ...]} (an (H, W, 3) array of integers 0..255);
the answer is {"predictions": [[class id, ...], ...]}, the (H, W) mask. Anything else
(floats, RGBA, grayscale, several images) gets a 400 saying what to send
(pipelines.serving.check_image). Ctrl-C stops it.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

from pipelines.exits import run_main
from pipelines.modelsource import ModelSourceError, open_store
from pipelines.params import load_params

DEFAULT_PORT = 5001  # beside the MLflow UI's 5000


class ServeError(RuntimeError):
    """A model that cannot be served; the message says why."""


def server_command(model: str, host: str, port: int, workers: int) -> list[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow), "models", "serve", "-m", model, "--env-manager", "local", "--host", host,
            "--port", str(port), "--workers", str(workers)]


def server_env(store: str) -> dict:
    """This environment's bin first on PATH; the model URI resolved against `store`."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "MLFLOW_TRACKING_URI": store,
            "MLFLOW_REGISTRY_URI": store}


def check_model(model: str, store: str) -> None:
    """Fail now, with the model's name, rather than in the server's start-up log."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.models.get_model_info(model)
    except (MlflowException, OSError) as err:
        message = getattr(err, "message", str(err))
        raise ServeError(f"model {model}: {message} (tracking store {store}; check the name and alias, "
                         "or run `fcn register`)") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="an MLflow model URI (default: models:/<mlflow.model_name>@<mlflow.alias>)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file naming the tracking store (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        params = load_params(args.params)
        model = args.model or f"models:/{params.mlflow.model_name}@{params.mlflow.alias}"
        store = open_store(params, model)
        check_model(model, store)
        print(f"[serve] {model} on http://{args.host}:{args.port}/invocations: POST "
              '{"inputs": <(H, W, 3) uint8 RGB image as nested lists>}; Ctrl-C stops it', flush=True)
        return subprocess.run(server_command(model, args.host, args.port, args.workers),
                              env=server_env(store)).returncode

    return run_main("serve", body, (ModelSourceError, ServeError), resume="run `fcn serve` again to restart it")


if __name__ == "__main__":
    sys.exit(main())
