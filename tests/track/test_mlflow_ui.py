"""The MLflow UI as a user sees it, in Debian's Chromium driven by Playwright.

A store is built with the stages' own functions: an FCN-8s training run (params, shards
as inputs, a validation curve), its checkpoint, the evaluation report and the register
stage. `fcn ui` serves it on a free port of 127.0.0.1 and prints the runs view; the test
opens that view and the registered version's page and reads the rendered DOM: the
runs are listed (not MLflow 3's empty GenAI traces view), and the version shows its
alias and the name of its source run, the run that trained it.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.ports import free_port

from pipelines.core.params import load_params
from pipelines.stages import register as register_stage
from pipelines.track import metrics_log, stage_runs
from pipelines.train import recipe
from support.checkpoints import make_checkpoint, write_evaluation
from support.training import WIDTH, write_shards

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    write_shards(root / "data" / "shards", n_train=2, n_val=2)
    (root / "params.yaml").write_text(yaml.safe_dump({"model": {"width": WIDTH, "imagenet_weights": None},
                                                      "train": {"val_every": 2}}))
    params = load_params(root / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        init = recipe.StageInit(source="random", path=None, note="random (no ImageNet weights)")
        run = stage_runs.open_stage_run(params, "fcn8s", root, "fcn8s-ui0test", str(root / "ray_results"), init, recipe.stage_params(params, "fcn8s", init))
        checkpoint = root / "models" / "fcn8s"
        scores = make_checkpoint(checkpoint, seed=6, mean_iu=0.6, run_id=run.run_id)
        rows = [{"iteration": i, "loss": 1.0 / i, "pixel_acc": 0.5 + i / 40, "mean_acc": 0.2 + i / 40,
                 "mean_iu": 0.1 + i / 40, "fw_iu": 0.4 + i / 40} for i in (2, 4, 6, 8, 10)]
        metrics_log.log_missing_rows(run.client(), run.run_id, rows)
        run.client().set_terminated(run.run_id, "FINISHED")
        write_evaluation(params, "fcn8s", checkpoint, scores)
        assert register_stage.main(["--params", str(root / "params.yaml")]) == 0
    return {"root": root, "run_name": run.client().get_run(run.run_id).info.run_name}


@pytest.fixture(scope="module")
def ui(store):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    log = open(store["root"] / "ui.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "pipelines.commands.ui", "--port", str(port), "--params",
                               str(store["root"] / "params.yaml")], cwd=store["root"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Uvicorn running" not in (text := (store["root"] / "ui.log").read_text()) \
                and "Application startup complete" not in text:
            assert server.poll() is None, f"fcn ui exited:\n{text[-3000:]}"
            assert time.monotonic() < deadline, f"the UI did not start in 180 s:\n{text[-3000:]}"
            time.sleep(1)
        runs_view = re.search(r"runs of 'fcn-voc': (\S+)", text)[1]
        yield {"base": f"http://127.0.0.1:{port}", "runs_view": runs_view}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh profile of its own (a new temp user-data-dir).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        yield page
        browser.close()


def test_the_printed_link_opens_the_runs_not_the_traces(ui, store, page):
    assert re.fullmatch(rf"{ui['base']}/#/experiments/\d+/runs\?workflowType=machine_learning", ui["runs_view"])
    page.goto(ui["runs_view"])
    page.get_by_text(store["run_name"]).first.wait_for()
    page.screenshot(path=str(store["root"] / "runs.png"))
    assert store["run_name"] in page.inner_text("body")


def test_the_version_page_shows_its_alias_and_its_source_run(ui, store, page):
    page.goto(f"{ui['base']}/#/models/fcn-voc/versions/1")
    page.get_by_text(store["run_name"]).first.wait_for()
    page.get_by_text("champion").first.wait_for()
    text = page.inner_text("body")
    page.screenshot(path=str(store["root"] / "version.png"))
    assert "champion" in text and store["run_name"] in text
    # The description (the model card) is on the page too.
    assert "fcn-voc version 1: FCN-8s" in text
