"""The package's floor plan, read from the source with ast: import rules, and the lists that must agree.

docs/ARCHITECTURE.md states the rules; these tests hold the code to them:
- no import cycles among the modules of pipelines and fcn_models (imports inside
  functions count too: they hold a cycle together just the same);
- a package of pipelines imports only from its own modules and lower layers (LAYERS), and
  nothing but pipelines.cli imports an entry point (pipelines.stages.*, pipelines.commands.*);
- pipelines.core and pipelines.data.shards load neither Ray, MLflow nor torch, and
  pipelines.data.dataset (the Ray Data pipeline's definitions) loads no torch;
- the served model (pipelines.serve.pyfunc_model) imports nothing of pipelines;
- fcn_models imports nothing of pipelines, ray, mlflow or dvc;
- the benchmarks time the training step training runs (pipelines.train.loop);
- dvc.yaml's train stage lists exactly what pipelines.train.recipe says decides its result,
  and every other stage depends on all the code it runs.
"""
import ast

import pytest
import yaml

from pipelines.core.params import PROJECT_ROOT
from pipelines.train import recipe
from support.imports import closure, cycles, import_graph, imports_of, internal

# Light: importing them loads none of these libraries, through anything they import.
LIGHT = (
    (("pipelines.core", "pipelines.data.shards"), ("ray", "mlflow", "torch"),
     "core and the shard contract stay free of Ray, MLflow and torch"),
    # Ray Data's coordinators and decode actors and Ray Train's controller unpickle what it defines.
    (("pipelines.data.dataset",), ("torch",),
     "the pipeline's definitions stay free of torch: Ray's own processes import them"),
)


# --------------------------------------------------------------------------- reading the imports











# The layers, lowest first: a package imports only from its own modules and from lower layers.
# Packages on one layer (train and serve; stages and commands) import nothing of each other.
LAYERS = (
    ("pipelines.core",),
    ("pipelines.data",),
    ("pipelines.track",),
    ("pipelines.train", "pipelines.serve"),
    ("pipelines.registry",),
    ("pipelines.stages", "pipelines.commands"),
    ("pipelines.cli",),
)
# Entry points: only the CLI imports them, and none imports another.
ENTRY_PACKAGES = ("pipelines.stages", "pipelines.commands")
# The served model is loaded where the project is not installed: it imports nothing of pipelines.
SERVED_MODEL = "pipelines.serve.pyfunc_model"


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer, package) of a pipelines module; None for the package's own __init__."""
    for level, packages in enumerate(LAYERS):
        for package in packages:
            if under(module, (package,)):
                return level, package
    return None


def rule_violations(graph: dict[str, set[str]]) -> list[str]:
    """The import rules of docs/ARCHITECTURE.md broken by a graph (module -> all its imports).

    The light modules' rules hold for everything they import of the packages too: a
    shards.py that imported a module importing Ray would load Ray just the same."""
    own = internal(graph)
    broken = []
    for module, imports in sorted(graph.items()):
        mine = layer_of(module)
        for imported in sorted(imports):
            is_entry = under(imported, ENTRY_PACKAGES) and imported not in ENTRY_PACKAGES
            if is_entry and module not in ("pipelines.cli", imported):
                broken.append(f"{module} imports the entry point {imported} (only pipelines.cli may)")
                continue
            if under(module, ("fcn_models",)) and under(imported, ("pipelines", "ray", "mlflow", "dvc")):
                broken.append(f"{module} imports {imported} (fcn_models is PyTorch only)")
            if module == SERVED_MODEL and under(imported, ("pipelines",)):
                broken.append(f"{module} imports {imported} (the served model imports nothing of pipelines)")
            theirs = layer_of(imported)
            if mine and theirs and mine[1] != theirs[1] and theirs[0] >= mine[0] and not is_entry:
                broken.append(f"{module} imports {imported} ({theirs[1]} is not below {mine[1]})")
        for light, heavy, why in LIGHT:
            if not under(module, light):
                continue
            for through in sorted(closure(own, [module])):
                via = "" if through == module else f" (through {through})"
                for imported in sorted(graph[through]):
                    if under(imported, heavy):
                        broken.append(f"{module} imports {imported}{via} ({why})")
    return broken




def source_file(module: str) -> str:
    """A module's file, relative to the project root."""
    path = PROJECT_ROOT.joinpath(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(PROJECT_ROOT))


def covered(file: str, deps) -> bool:
    """Whether a dvc.yaml dependency list names the file or a directory holding it."""
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def code_files(modules) -> set[str]:
    # A package's __init__ runs on import, but ours only declare names.
    return {f for f in map(source_file, modules) if not f.endswith("__init__.py")}


# --------------------------------------------------------------------------- the package

GRAPH = import_graph(PROJECT_ROOT)
# The benchmarks too: they time the shared modules, never a stage's entry point.
BENCH_GRAPH = import_graph(PROJECT_ROOT, ("bench",))


def test_the_package_has_no_import_cycle():
    assert cycles(internal(GRAPH)) == []


def test_the_package_keeps_its_import_rules():
    assert rule_violations(GRAPH) == []
    assert rule_violations({**GRAPH, **BENCH_GRAPH}) == []
    assert "bench.bench_preprocess" in BENCH_GRAPH
    # The rules saw the modules they are about.
    assert {"pipelines.cli", "pipelines.stages.train", "pipelines.data.shards", "fcn_models.fcn"} <= set(GRAPH)


def test_the_checker_finds_a_cycle_an_entry_point_import_a_layer_break_and_a_heavy_library(tmp_path):
    files = {
        "pipelines/__init__.py": "",
        "pipelines/cli.py": "import importlib\nfrom pipelines.stages import train\n",
        "pipelines/stages/__init__.py": "",
        "pipelines/stages/train.py": "from pipelines.train import loop\n",
        "pipelines/stages/evaluate.py": "from pipelines.stages.train import main\n",
        "pipelines/commands/predict.py": "from pipelines.stages.evaluate import main\n",
        "pipelines/train/loop.py": "import torch\ndef f():\n    from pipelines.data.dataset import x\n",
        "pipelines/data/dataset.py": "from pipelines.train import loop\n",
        "pipelines/data/shards.py": "import torch\ndef g():\n    import ray.data\n",
        "pipelines/track/tracking.py": "from pipelines.stages.train import main\n",
        "pipelines/core/params.py": "def h():\n    from pipelines.train import cluster\n",
        "pipelines/train/cluster.py": "import ray\n",
        "pipelines/serve/batch.py": "from pipelines.train import cluster\n",
        "pipelines/serve/pyfunc_model.py": "from pipelines.core import files\n",
        "pipelines/core/files.py": "",
        "pipelines/registry/publish.py": "from pipelines.serve import batch\nfrom pipelines.track import tracking\n",
        "fcn_models/__init__.py": "",
        "fcn_models/fcn.py": "from pipelines.data import shards\n",
        "bench/bench_train.py": "from pipelines.stages.train import main\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("pipelines", "fcn_models", "bench"))
    assert cycles(internal(graph)) == [["pipelines.data.dataset", "pipelines.train.loop"]]
    assert rule_violations(graph) == [
        "bench.bench_train imports the entry point pipelines.stages.train (only pipelines.cli may)",
        "fcn_models.fcn imports pipelines.data (fcn_models is PyTorch only)",
        "fcn_models.fcn imports pipelines.data.shards (fcn_models is PyTorch only)",
        "pipelines.commands.predict imports the entry point pipelines.stages.evaluate (only pipelines.cli may)",
        "pipelines.core.params imports pipelines.train (pipelines.train is not below pipelines.core)",
        "pipelines.core.params imports pipelines.train.cluster (pipelines.train is not below pipelines.core)",
        "pipelines.core.params imports ray (through pipelines.train.cluster) (core and the shard contract stay "
        "free of Ray, MLflow and torch)",
        "pipelines.data.dataset imports pipelines.train (pipelines.train is not below pipelines.data)",
        "pipelines.data.dataset imports pipelines.train.loop (pipelines.train is not below pipelines.data)",
        "pipelines.data.dataset imports torch (through pipelines.train.loop) (the pipeline's definitions stay "
        "free of torch: Ray's own processes import them)",
        "pipelines.data.shards imports ray.data (core and the shard contract stay free of Ray, MLflow and torch)",
        "pipelines.data.shards imports torch (core and the shard contract stay free of Ray, MLflow and torch)",
        "pipelines.serve.batch imports pipelines.train (pipelines.train is not below pipelines.serve)",
        "pipelines.serve.batch imports pipelines.train.cluster (pipelines.train is not below pipelines.serve)",
        "pipelines.serve.pyfunc_model imports pipelines.core (the served model imports nothing of pipelines)",
        "pipelines.serve.pyfunc_model imports pipelines.core.files (the served model imports nothing of pipelines)",
        "pipelines.stages.evaluate imports the entry point pipelines.stages.train (only pipelines.cli may)",
        "pipelines.track.tracking imports the entry point pipelines.stages.train (only pipelines.cli may)",
    ]


def test_the_package_inits_only_declare_names():
    # So no dvc.yaml stage need depend on them, and importing one part loads no other.
    for init in sorted((PROJECT_ROOT / "pipelines").rglob("__init__.py")):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), init


def test_the_training_benchmark_times_the_step_training_runs():
    bench = PROJECT_ROOT / "bench" / "bench_train_overhead.py"
    tree = ast.parse(bench.read_text())
    assert "pipelines.train.loop" in imports_of(bench, PROJECT_ROOT) or "pipelines" in imports_of(bench, PROJECT_ROOT)
    calls = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert "train_step" in calls and "StageWorker" in calls
    # No step of its own: the loss and backward pass are the loop's.
    assert not {"backward", "segmentation_loss", "zero_grad"} & calls


# --------------------------------------------------------------------------- dvc.yaml and the code

DVC = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def test_the_train_stage_lists_exactly_what_decides_its_result():
    do = DVC["train"]["do"]
    assert do["params"] == [key.format(stage="${key}") for key in recipe.RESULT_PARAMS]
    assert do["deps"] == [*recipe.CODE_DEPS, "${data.shards_dir}", "${item.starts_from}"]
    assert do["cmd"] == "python -m pipelines.stages.train --stage ${key}"


def test_code_deps_are_the_loop_the_data_the_recipe_and_what_they_import():
    graph = internal(GRAPH)
    deciding = code_files(closure(graph, ["pipelines.train.loop", "pipelines.data.dataset",
                                          "pipelines.data.batches", "pipelines.train.recipe"])
                          | {"pipelines.train.trainer"})
    assert [f for f in sorted(deciding) if not covered(f, recipe.CODE_DEPS)] == []
    # Nothing more: each entry covers code that decides the result.
    assert [d for d in recipe.CODE_DEPS if not any(covered(f, [d]) for f in deciding)] == []


@pytest.mark.parametrize("stage", sorted(set(DVC) - {"train"}))
def test_every_other_stage_depends_on_all_the_code_it_runs(stage):
    module = DVC[stage]["cmd"].split()[2]
    assert module in GRAPH, DVC[stage]["cmd"]
    deps = [d for d in DVC[stage]["deps"] if "${" not in d]
    missing = {f for f in code_files(closure(internal(GRAPH), [module])) if not covered(f, deps)}
    assert not missing, f"dvc.yaml stage {stage} runs {sorted(missing)} without depending on them"
