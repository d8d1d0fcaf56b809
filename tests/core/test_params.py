import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.core.params import (
    PROJECT_ROOT,
    ArchiveParams,
    DataParams,
    Params,
    ParamsError,
    load_params,
    parse_params,
)

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
