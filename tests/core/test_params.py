import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.core.params import (
    PROJECT_ROOT,
    ArchiveParams,
    DataParams,
    Params,
    MAX_PARAMS_BYTES,
    ParamsError,
    load_params,
    parse_params,
)
from support.limited import MiB, run_fcn
from support.stages import one_line

PROJECT_PARAMS = PROJECT_ROOT / "params.yaml"


def _data_section(**changes) -> dict:
    data = yaml.safe_load(PROJECT_PARAMS.read_text())["data"]
    data.update(changes)
    return {"data": data}


def _write(tmp_path: Path, mapping) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def test_project_params_name_every_data_key_and_match_the_defaults():
    written = yaml.safe_load(PROJECT_PARAMS.read_text())["data"]
    assert set(written) == {f.name for f in dataclasses.fields(DataParams)}
    assert set(written["voc"]) == set(written["sbd"]) == {f.name for f in dataclasses.fields(ArchiveParams)}
    # the file and the code's defaults describe the same real archives
    assert load_params(PROJECT_PARAMS).data == parse_params({}, root=PROJECT_ROOT).data
    assert written["voc"]["mirrors"][0].startswith("http://host.robots.ox.ac.uk/")


@pytest.mark.parametrize("mapping, key", [
    (_data_section(shard_max_byte=1024), "data.shard_max_byte"),
    ({"dta": {}}, "dta"),
    (_data_section(voc={"filename": "x.tar", "md5": "0" * 32, "url": "http://x"}), "data.voc.url"),
])
def test_unknown_keys_are_refused_by_name(tmp_path, mapping, key):
    with pytest.raises(ParamsError, match=rf"unknown key {key}\b"):
        load_params(_write(tmp_path, mapping))


@pytest.mark.parametrize("changes, key", [
    ({"shard_max_bytes": "big"}, "data.shard_max_bytes"),
    ({"shard_max_bytes": 10}, "data.shard_max_bytes"),
    ({"on_bad_sample": "ignore"}, "data.on_bad_sample"),
    ({"workers": -1}, "data.workers"),
    ({"retries": True}, "data.retries"),
    ({"timeout_s": 0}, "data.timeout_s"),
    ({"raw_dir": 5}, "data.raw_dir"),
    ({"sbd": {"filename": "benchmark.tgz", "md5": "not-an-md5"}}, "benchmark.tgz"),
    ({"voc": {"md5": "0" * 32}}, "filename"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path, changes, key):
    path = _write(tmp_path, _data_section(**changes))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert key in str(err.value)
    assert str(path) in str(err.value)


def test_partial_params_fill_in_defaults():
    params = parse_params({"data": {"workers": 3, "on_bad_sample": "skip"}})
    assert params.data.workers == 3
    assert params.data.on_bad_sample == "skip"
    assert params.data.shard_max_bytes == DataParams().shard_max_bytes
    assert parse_params({"data": {"timeout_s": 5}}).data.timeout_s == 5.0


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match=r"broken\.yaml: not valid YAML"):
        load_params(broken)


def _path_fields(params, prefix=""):
    """{dotted key: value} of every field marked as a path."""
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.metadata.get("path"):
            out[prefix + f.name] = value
        elif dataclasses.is_dataclass(value):
            out.update(_path_fields(value, f"{prefix}{f.name}."))
    return out


def test_paths_are_resolved_once_against_the_params_files_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    path = _write(project, {
        "data": {"raw_dir": "data/raw", "local_dir": "file:///srv/archives", "shards_dir": str(tmp_path / "abs")},
        "ray": {"storage_path": "s3://bucket/runs"},
        "mlflow": {"tracking_uri": "sqlite:///db/mlflow.db"},
    })
    monkeypatch.chdir(tmp_path)  # not the project: a relative path must not follow the working directory
    params = load_params(path)
    paths = _path_fields(params)
    assert params.data.raw_dir == str(project / "data" / "raw")
    assert params.data.shards_dir == str(tmp_path / "abs")          # absolute: kept
    assert params.data.local_dir == "file:///srv/archives"           # a URI: kept
    assert params.ray.storage_path == "s3://bucket/runs"
    assert params.mlflow.tracking_uri == f"sqlite:///{project / 'db' / 'mlflow.db'}"
    assert params.train.models_dir == str(project / "models")         # defaults too
    assert params.model.imagenet_weights == str(project / "models" / "imagenet" / "vgg16.pth")
    # Every path field is absolute (or a URI, or unset) after loading.
    assert all(v is None or "://" in v or Path(v).is_absolute() for v in paths.values()), paths
    assert {"data.raw_dir", "train.models_dir", "evaluate.report_file", "mlflow.registry_file",
            "mlflow.db_file", "ray.storage_path"} <= set(paths)
    # Without a root (a mapping built in code) paths stay as written.
    assert parse_params({"data": {"raw_dir": "data/raw"}}).data.raw_dir == "data/raw"
    assert isinstance(params, Params)


def test_input_norm_is_the_backbones_own_unless_named():
    from fcn_models.norms import PRESETS

    assert parse_params({}).model.input_norm is None
    assert parse_params({"model": {"input_norm": "caffe-bgr"}}).model.input_norm == "caffe-bgr"
    with pytest.raises(ParamsError, match="model.input_norm.*" + ", ".join(PRESETS)):
        parse_params({"model": {"input_norm": "bgr"}})
    with pytest.raises(ParamsError, match="model.backbone"):
        parse_params({"model": {"backbone": "resnet50"}})


# ---------------------------------------------------------------- hostile files

# `fcn fetch` reads nothing before the params file, and no file below starts a download.
FETCH_LIMIT = 512 * MiB


def _alias_bomb() -> str:
    """A few hundred bytes whose aliases, nested nine deep, expand to 9**9 strings."""
    items, previous = [], None
    for name in "abcdefghi":
        body = ", ".join(["x"] * 9 if previous is None else [f"*{previous}"] * 9)
        items.append(f"&{name} [{body}]")
        previous = name
    return "model: {backbone: [" + ", ".join(items) + "]}\n"


def test_expanding_aliases_are_refused_in_one_line_without_expanding_them(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 400
    result = run_fcn(["fetch", "--params", path], FETCH_LIMIT, cwd=tmp_path)
    err = one_line(result.stderr)
    assert result.returncode == 2, err
    assert str(path) in err and "alias" in err and "line 1" in err
    with pytest.raises(ParamsError, match="alias"):
        load_params(path)


def test_an_alias_that_repeats_a_value_is_read_as_the_value(tmp_path):
    # yaml.safe_dump writes a value it meets twice as an anchor and an alias: such a file reads.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  stages:\n"
                    "    fcn32s: &stage {init: imagenet, lr: 1.0e-10, iterations: 4}\n"
                    "    fcn16s: *stage\n"
                    "evaluate: {stages: [fcn32s, fcn16s]}\n")
    params = load_params(path)
    assert params.train.stages["fcn16s"].iterations == params.train.stages["fcn32s"].iterations == 4


def test_a_params_file_past_the_size_bound_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "params.yaml"
    with path.open("w") as fh:
        fh.write("model: {width: 9}\n")  # reading on past the bound would report this instead
        line = "# " + "x" * 1021 + "\n"
        for _ in range(MAX_PARAMS_BYTES // len(line) + 1):
            fh.write(line)
    result = run_fcn(["fetch", "--params", path], FETCH_LIMIT, cwd=tmp_path)
    err = one_line(result.stderr)
    assert result.returncode == 2, err
    assert str(path) in err and f"{MAX_PARAMS_BYTES:,} bytes" in err and "width" not in err


@pytest.mark.parametrize("text, key, lines", [
    ("model:\n  width: 1.0\nmodel:\n  width: 9\n", "model", (1, 3)),
    ("data:\n  workers: 1\n  retries: 2\n  workers: 3\nmodel: {width: 9}\n", "workers", (2, 4)),
    ("train:\n  stages:\n    a: {init: imagenet, lr: 1, iterations: 1, lr: 2}\nmodel: {width: 9}\n", "lr", (3, 3)),
])
def test_a_duplicated_key_is_refused_at_any_level_naming_it_and_its_lines(tmp_path, text, key, lines):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    result = run_fcn(["fetch", "--params", path], FETCH_LIMIT, cwd=tmp_path)
    err = one_line(result.stderr)
    assert result.returncode == 2, err
    assert f"{path}: line {lines[1]}: duplicate key {key!r} (first on line {lines[0]})" in err, err


def test_a_long_value_is_shown_truncated_in_its_message():
    huge = [list(range(1000))] * 1000
    with pytest.raises(ParamsError) as err:
        parse_params({"model": {"backbone": huge}})
    message = str(err.value)
    assert message.startswith("params: model.backbone = [[0, 1, ") and len(message) < 400, message[:500]
    with pytest.raises(ParamsError) as err:
        parse_params({"evaluate": {"stages": [], "references": ["x" * 100_000] * 2}})
    assert len(str(err.value)) < 400
