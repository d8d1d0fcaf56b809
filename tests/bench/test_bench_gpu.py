"""bench/bench_gpu.py on the CPU at small sizes: every mode and precision runs the stage's real
training step, the numbers it reports hang together, and it needs neither Ray nor MLflow
(the GPU machines it is for have neither)."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest

from pipelines.core.params import PROJECT_ROOT
from support.imports import import_graph, imports_of

BENCH = PROJECT_ROOT / "bench" / "bench_gpu.py"
SMALL = ["--size", "40", "--crop", "36", "--crop-batch", "2", "--width", "0.0625", "--steps", "1", "--warmup", "1",
         "--matmul", "128", "--device", "cpu", "--variants", "fcn8s", "--no-write"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # its benchdoc, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(bench):
    args = bench.parse_args([*SMALL, "--settings", "fp32", "fp16", "bf16-cl"])
    return args, bench.run(args)


def test_every_mode_and_setting_runs_the_training_step(result):
    args, measured = result
    rows = measured["rows"]
    assert [(r["setting"], r["mode"]) for r in rows] == [
        (s, m) for s in ("fp32", "fp16", "bf16-cl") for m in ("forward", "train whole", "train crops")]
    assert not any("error" in r for r in rows)
    for r in rows:
        assert r["ms"] > 0 and math.isclose(r["images_s"], r["batch"] / (r["ms"] / 1e3), rel_tol=1e-9)
        assert math.isclose(r["tflops"], r["flops"] / (r["ms"] / 1e3) / 1e12, rel_tol=1e-9)
        assert r["peak_gib"] is None  # no GPU memory on a CPU
        if r["mode"] != "forward":
            # A real step of the reference SGD on every learning parameter; float16 goes through the
            # grad scaler, the others do not.
            assert r["stepped"], r
            assert (r["scale"] is not None) == (r["setting"] == "fp16"), r
    batches = {r["mode"]: (r["batch"], r["size"]) for r in rows}
    assert batches == {"forward": (1, "40x40"), "train whole": (1, "40x40"), "train crops": (2, "36x36")}
    assert measured["baseline"] > 0


def test_flops_are_the_networks_forward_and_the_steps_backward(bench, result):
    _, measured = result
    flops = {r["mode"]: r["flops"] for r in measured["rows"] if r["setting"] == "fp32"}
    forward, step = bench.count_flops("fcn8s", 0.0625, 1, 40, 40)
    assert flops["forward"] == forward
    assert flops["train whole"] == step
    # The backward pass costs about twice the forward (gradients of inputs and of weights), less
    # the frozen upsampling's weights and the first layer's input.
    assert 2.5 * forward < step <= 3 * forward
    # Crops: per image, the FLOPs of a 36x36 input (the 100-pixel padding makes it 236x236).
    _, crops_step = bench.count_flops("fcn8s", 0.0625, 2, 36, 36)
    assert flops["train crops"] == crops_step and crops_step > 1.9 * bench.count_flops("fcn8s", 0.0625, 1, 36, 36)[1]


def test_report_has_a_row_each_and_says_which_goals_hold(bench, result, tmp_path):
    args, measured = result
    report = bench.format_report(measured, args)
    table = [line for line in report.splitlines() if line.startswith("| fcn8s |")]
    assert len(table) == len(measured["rows"])
    goals = [line for line in report.splitlines() if line.startswith("- ")]
    assert [g.split(":")[0] for g in goals] == ["- FCN-8s forward at 40x40", "- training with 36x36 crops",
                                                "- training step"]
    assert all(g.endswith(("met", "not met")) for g in goals)
    # Into its own section of a BENCHMARKS.md, the rest kept.
    from benchdoc import write_section

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    write_section(bench.SECTION, bench.BENCH_NAME, report, doc)
    text = doc.read_text()
    assert "kept" in text and bench.SECTION in text and text.count("| fcn8s |") == len(table)


def test_compiled_step_runs_and_trains(bench):
    # aot_eager: the graphs torch.compile captures, forward and backward, without inductor's
    # kernel generation (minutes on 2 cores); the GPU run uses inductor.
    args = bench.parse_args([*SMALL, "--settings", "bf16-cl-compile", "--modes", "forward", "train crops",
                             "--compile-backend", "aot_eager"])
    forward, step = bench.run(args)["rows"]
    assert "error" not in forward and "error" not in step
    assert step["stepped"] and step["flops"] == bench.count_flops("fcn8s", 0.0625, 2, 36, 36)[1]


def test_the_benchmark_imports_neither_ray_nor_mlflow():
    graph = import_graph(PROJECT_ROOT)
    ours = {m for m in imports_of(BENCH, PROJECT_ROOT) if m in graph}
    # `from pipelines.train import loop` imports the package too (a docstring only).
    assert ours <= {"pipelines", "pipelines.train", "pipelines.train.loop", "pipelines.core.params",
                    "pipelines.train.recipe"} | {
        m for m in graph if m.startswith("fcn_models")}, ours


BLOCKED = ("ray", "mlflow", "dvc", "pyarrow", "albumentations", "cv2")
# Run in a fresh interpreter where importing any of BLOCKED fails, as on a machine without them.
WITHOUT = f"""
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, Absent())
sys.argv = [{str(BENCH)!r}, *sys.argv[1:]]
sys.path.insert(0, {str(BENCH.parent)!r})  # as `python bench/bench_gpu.py` has it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_benchmark_runs_where_ray_mlflow_and_pyarrow_are_missing():
    result = subprocess.run([sys.executable, "-c", WITHOUT, *SMALL, "--settings", "bf16", "--modes", "train crops"],
                            capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| fcn8s | bf16 | train crops |")]
    assert len(table) == 1, result.stdout
