"""The package's floor plan, read from the source with ast: import rules, and the lists that must agree.

docs/ARCHITECTURE.md states the rules; these tests hold the code to them:
- no import cycles among the modules of pipelines and fcn_models (imports inside
  functions count too: they hold a cycle together just the same);
- nothing but pipelines.cli imports a stage (pipelines.stages.*);
- pipelines.params, .files and .shards import neither Ray nor MLflow (shards not torch);
- fcn_models imports nothing of pipelines, ray, mlflow or dvc;
- the benchmarks time the training step training runs (pipelines.loop);
- dvc.yaml's train stage lists exactly what pipelines.recipe says decides its result,
  and every other stage depends on all the code it runs.
"""
import ast
from pathlib import Path

import pytest
import yaml

from pipelines import recipe
from pipelines.params import PROJECT_ROOT

PACKAGES = ("pipelines", "fcn_models")
NO_RAY_NO_MLFLOW = ("pipelines.params", "pipelines.files", "pipelines.shards")
HEAVY = ("ray", "mlflow")


# --------------------------------------------------------------------------- reading the imports

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module a file imports, anywhere in it, as absolute dotted names; `from a import b`
    counts as a.b when that is a module of the tree, else as a."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                as_path = root.joinpath(*candidate.split("."))
                if as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file():
                    found.add(candidate)
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: every module it imports} for the .py files of the packages under root."""
    graph = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                graph[module_name(path, root)] = imports_of(path, root)
    return graph


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph restricted to the packages' own modules."""
    return {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def rule_violations(graph: dict[str, set[str]]) -> list[str]:
    """The import rules of docs/ARCHITECTURE.md broken by a graph (module -> all its imports).

    The light modules' rules hold for everything they import of the packages too: a
    shards.py that imported a module importing Ray would load Ray just the same."""
    def under(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    own = internal(graph)
    broken = []
    for module, imports in sorted(graph.items()):
        for imported in sorted(imports):
            is_stage = under(imported, ("pipelines.stages",)) and imported != "pipelines.stages"
            if is_stage and module not in ("pipelines.cli", imported):
                broken.append(f"{module} imports the stage {imported} (only pipelines.cli may)")
            if under(module, ("fcn_models",)) and under(imported, ("pipelines", "ray", "mlflow", "dvc")):
                broken.append(f"{module} imports {imported} (fcn_models is PyTorch only)")
        if module not in NO_RAY_NO_MLFLOW:
            continue
        for through in sorted(closure(own, [module])):
            via = "" if through == module else f" (through {through})"
            for imported in sorted(graph[through]):
                if under(imported, HEAVY):
                    broken.append(f"{module} imports {imported}{via} (params, files and shards stay free of "
                                  "Ray and MLflow)")
                if module == "pipelines.shards" and under(imported, ("torch",)):
                    broken.append(f"{module} imports {imported}{via} (the shard contract needs no torch)")
    return broken


def closure(graph: dict[str, set[str]], starts) -> set[str]:
    seen, todo = set(), list(starts)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


def source_file(module: str) -> str:
    """A module's file, relative to the project root."""
    path = PROJECT_ROOT.joinpath(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(PROJECT_ROOT))


def covered(file: str, deps) -> bool:
    """Whether a dvc.yaml dependency list names the file or a directory holding it."""
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def code_files(modules) -> set[str]:
    # A package's __init__ runs on import, but ours only declare names.
    return {source_file(m) for m in modules} - {"pipelines/__init__.py", "pipelines/stages/__init__.py",
                                                 "fcn_models/__init__.py"}


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
    assert {"pipelines.cli", "pipelines.stages.train", "pipelines.shards", "fcn_models.fcn"} <= set(GRAPH)


def test_the_checker_finds_a_cycle_a_stage_import_and_a_heavy_library(tmp_path):
    files = {
        "pipelines/__init__.py": "",
        "pipelines/cli.py": "import importlib\nfrom pipelines.stages import train\n",
        "pipelines/stages/__init__.py": "",
        "pipelines/stages/train.py": "from pipelines import loop\n",
        "pipelines/stages/evaluate.py": "from pipelines.stages.train import main\n",
        "pipelines/loop.py": "def f():\n    from pipelines.dataset import x\n",
        "pipelines/dataset.py": "from . import loop\n",
        "pipelines/shards.py": "import torch\ndef g():\n    import ray.data\n",
        "pipelines/tracking.py": "from pipelines.stages.train import main\n",
        "pipelines/params.py": "def h():\n    from pipelines import cluster\n",
        "pipelines/cluster.py": "import ray\n",
        "fcn_models/__init__.py": "",
        "fcn_models/fcn.py": "from pipelines import shards\n",
        "bench/bench_train.py": "from pipelines.stages.train import main\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("pipelines", "fcn_models", "bench"))
    assert cycles(internal(graph)) == [["pipelines.dataset", "pipelines.loop"]]
    assert rule_violations(graph) == [
        "bench.bench_train imports the stage pipelines.stages.train (only pipelines.cli may)",
        "fcn_models.fcn imports pipelines (fcn_models is PyTorch only)",
        "fcn_models.fcn imports pipelines.shards (fcn_models is PyTorch only)",
        "pipelines.params imports ray (through pipelines.cluster) (params, files and shards stay free of Ray "
        "and MLflow)",
        "pipelines.shards imports ray.data (params, files and shards stay free of Ray and MLflow)",
        "pipelines.shards imports torch (the shard contract needs no torch)",
        "pipelines.stages.evaluate imports the stage pipelines.stages.train (only pipelines.cli may)",
        "pipelines.tracking imports the stage pipelines.stages.train (only pipelines.cli may)",
    ]


def test_the_training_benchmark_times_the_step_training_runs():
    bench = PROJECT_ROOT / "bench" / "bench_train_overhead.py"
    tree = ast.parse(bench.read_text())
    assert "pipelines.loop" in imports_of(bench, PROJECT_ROOT) or "pipelines" in imports_of(bench, PROJECT_ROOT)
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
    deciding = code_files(closure(graph, ["pipelines.loop", "pipelines.dataset", "pipelines.recipe"])
                          | {"pipelines.training"})
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
