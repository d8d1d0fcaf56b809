"""Serve: a registered model as a REST endpoint, MLflow's scoring server on 127.0.0.1.

    fcn serve [--model models:/fcn-voc@champion] [--port 5001] [--params params.yaml]

Runs MLflow's scoring server (the app `mlflow models serve` runs) in uvicorn in this
environment, against the tracking store the params file names, behind a request body
limit from the model's pixel limit: a larger body gets a 413 before it is read
(pipelines.serve.scoring_app). POST one image to http://127.0.0.1:PORT/invocations as
JSON, {"inputs": [[[r, g, b], ...], ...]} (an (H, W, 3) array of integers 0..255);
the answer is {"predictions": [[class id, ...], ...]}, the (H, W) mask. Anything else
(floats, RGBA, grayscale, several images) gets a 400 saying what to send
(pipelines.serve.pyfunc_model.check_image). Ctrl-C or SIGTERM stops it and every
process it started.
"""
import argparse
import sys

from pipelines.core.exits import run_main
from pipelines.core.params import load_params
from pipelines.core.processes import run_group
from pipelines.serve.model_source import check_model, default_model_uri, open_store
from pipelines.serve.scoring_app import server_command, server_env

DEFAULT_PORT = 5001  # beside the MLflow UI's 5000


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
        model = args.model or default_model_uri(params)
        store = open_store(params, model)
        check_model(model, store)
        print(f"[serve] {model} on http://{args.host}:{args.port}/invocations: POST "
              '{"inputs": <(H, W, 3) uint8 RGB image as nested lists>}; Ctrl-C stops it', flush=True)
        return run_group(server_command(args.host, args.port, args.workers), env=server_env(store, model))

    return run_main("serve", body, resume="run `fcn serve` again to restart it")


if __name__ == "__main__":
    sys.exit(main())
