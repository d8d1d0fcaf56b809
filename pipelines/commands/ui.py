"""UI: the MLflow UI over the project's store, on 127.0.0.1, opened at the pipeline's runs.

    fcn ui [--port 5000] [--params params.yaml]        (or `make mlflow-ui`)

Prints the addresses to open: MLflow 3's UI starts in its GenAI view (traces), so the
experiment's runs are at #/experiments/<id>/runs?workflowType=machine_learning, and
the registered model at #/models/<name>. Then runs `mlflow ui` with one worker
process, which is plenty for one person and fits a small machine. Ctrl-C or SIGTERM
stops it and every process it started.
"""
import argparse
import sys

from pipelines.core.exits import run_main
from pipelines.core.params import load_params
from pipelines.core.processes import run_group
from pipelines.serve.model_source import open_store
from pipelines.track.mlflow_cli import mlflow_cli
from pipelines.track.store import runs_view


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn ui", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file naming the tracking store (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        import mlflow

        params = load_params(args.params)
        store = open_store(params, f"experiment {params.mlflow.experiment}")
        base = f"http://{args.host}:{args.port}"
        experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
        if experiment is not None:
            print(f"[ui] runs of {params.mlflow.experiment!r}: {runs_view(base, experiment.experiment_id)}")
        print(f"[ui] registered model {params.mlflow.model_name!r}: {base}/#/models/{params.mlflow.model_name}",
              flush=True)
        command = [mlflow_cli(), "ui", "--backend-store-uri", store,
                   "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
        return run_group(command)

    return run_main("ui", body, resume="run `fcn ui` again to restart it")


if __name__ == "__main__":
    sys.exit(main())
