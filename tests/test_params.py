import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.params import (
    PROJECT_ROOT, ArchiveParams, DataParams, ParamsError, load_params, parse_params, resolve,
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
    assert load_params(PROJECT_PARAMS).data == DataParams()
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


def test_resolve_keeps_absolute_paths_and_anchors_relative_ones(tmp_path):
    assert resolve("data/raw", tmp_path) == tmp_path / "data" / "raw"
    assert resolve(tmp_path / "x", Path("/elsewhere")) == tmp_path / "x"
    assert resolve("data/raw") == PROJECT_ROOT / "data" / "raw"
