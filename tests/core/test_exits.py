"""Every stage ends the same way: a params error is 2, any other stage error 1, Ctrl-C 130, each with one line.

The structure is read from the source (every stage's main goes through
pipelines.core.exits.run_main); the behaviour is run: a params file with an unknown key
in every stage that reads one, a report that cannot be written, Ctrl-C (SIGINT) to
a stage working in a process of its own.
"""
import ast
import os
import signal
import subprocess
import sys

import pytest
import yaml

from pipelines import cli
from pipelines.core.params import PROJECT_ROOT
from support.process_trees import ctrl_c_reaches_children
from support.stages import one_line, stage
from support.training import WIDTH, write_shards

STAGES = {name: module for name, (module, _) in cli.COMMANDS.items() if module.startswith(("pipelines.stages.", "pipelines.commands."))}
READS_PARAMS = {"fetch": [], "preprocess": [], "train": ["--stage", "fcn32s"], "evaluate": [], "register": [],
                "predict": ["photo.png"], "status": [], "predict-batch": ["images", "--out", "out"], "serve": [],
                "ui": [], "export": ["models:/fcn-voc@champion", "--onnx", "model.onnx"],
                "seeds": ["--stage", "fcn8s", "--seeds", "0", "1"],
                "scaling-study": ["--stage", "fcn32s", "--seeds", "0", "1"]}


def test_every_stage_ends_through_run_main():
    assert set(READS_PARAMS) | {"demo-data", "import", "demo", "standin"} == set(STAGES)
    for name, module in STAGES.items():
        path = PROJECT_ROOT / (module.replace(".", "/") + ".py")
        main = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main")
        returns = [n.value for n in own_nodes(main) if isinstance(n, ast.Return)]
        assert len(returns) == 1 and isinstance(returns[0], ast.Call) and returns[0].func.id == "run_main", name


def own_nodes(function):
    """The nodes of a function's body, not those of the functions defined in it."""
    todo = list(function.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            continue
        yield node
        todo += ast.iter_child_nodes(node)


@pytest.mark.parametrize("name", sorted(READS_PARAMS))
def test_a_params_error_is_status_2_with_one_line_naming_the_key(name, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"val_evry": 5}}))
    status, err = stage(cli.main, name, *READS_PARAMS[name], "--params", str(params))
    assert status == 2
    assert one_line(err) == (f"{name}: {params}: unknown key train.val_evry (known in train: "
                             + err.split("(known in train: ")[1].strip())


def test_the_demo_outside_a_project_is_status_2_with_one_line_naming_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = stage(cli.main, "demo")
    assert status == 2
    assert one_line(err) == (f"demo: {tmp_path} holds no dvc.yaml and conf/profile/demo.yaml: run fcn demo in the "
                             "project's root directory (make demo does)")
    assert not (tmp_path / "data").exists()


def test_a_file_that_cannot_be_written_is_status_1_with_one_line_naming_it(tmp_path):

    from fcn_models.checkpoint import save_checkpoint
    from fcn_models.fcn import build_fcn

    write_shards(tmp_path / "shards", n_train=1, n_val=1)
    save_checkpoint(tmp_path / "models" / "fcn8s", build_fcn("fcn8s", width=WIDTH), {"stage": "fcn8s"})
    (tmp_path / "reports").write_text("a file where the reports directory belongs\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"shards_dir": "shards"}, "model": {"width": WIDTH},
                                      "evaluate": {"stages": ["fcn8s"], "timing_images": 1}}))
    status, err = stage(cli.main, "evaluate", "--params", str(params), "--device", "cpu")
    assert status == 1
    reports = tmp_path / "reports"
    assert one_line(err) == (f"evaluate: {reports / 'evaluation.json'}: {reports} is a file, not a directory, so "
                             f"nothing can be written under it: choose a path whose parents are directories, or "
                             f"move {reports} away")


def test_ctrl_c_is_status_130_with_a_line_saying_how_to_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))
                                                       if p)}
    # A mirror large enough to be interrupted while it is written.
    with ctrl_c_reaches_children():
        process = subprocess.Popen([sys.executable, "-m", "pipelines.commands.demo_data", "--out",
                                    str(tmp_path / "m"), "--train", "4000", "--val", "100", "--max-side", "160",
                                    "--workers", "1"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   start_new_session=True)
    try:
        line = process.stderr.readline()  # the first progress line: it is working
        assert line.startswith("images: "), line
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130
    assert one_line(err) == "demo-data: interrupted; run the same command again"
