"""`fcn predict-batch` over hostile Parquet rows: each bad row is a listed failure, the good ones are written.

A shard is data: its `image` column holds encoded bytes, never a path to open. The
actors keep no scratch copy of the model once it is loaded.
"""
import io
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from fcn_models.checkpoint import META_FILE, MODEL_FILE
from pipelines import cli
from pipelines.serve import batch
from support.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_rows")
    make_checkpoint(root / "ckpt", seed=6, mean_iu=0.5)
    (root / "params.yaml").write_text(yaml.safe_dump({"ray": {"num_workers": 1, "cpus_per_worker": 0.5,
                                                              "data_cpus": 0.5}}))
    return root


def png_bytes(seed: int, size=(20, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def run(project, parquet, out, capsys):
    status = cli.main(["predict-batch", str(parquet), "--model", str(project / "ckpt"), "--out", str(out),
                       "--actors", "1", "--params", str(project / "params.yaml")])
    captured = capsys.readouterr()
    return status, captured, {r["image"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}


def test_a_path_in_the_image_column_is_a_failure_not_a_file_read(project, ray_cluster, tmp_path, capsys):
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes(1))
    pq.write_table(pa.table({"id": ["path"], "image": [str(secret)]}), tmp_path / "paths.parquet")
    status, captured, summary = run(project, tmp_path / "paths.parquet", tmp_path / "out", capsys)
    assert status == 0 and "0 of 1 images segmented" in captured.out
    assert "not an encoded image" in summary["path"]["error"]
    assert summary["path"]["mask"] is None and not (tmp_path / "out" / "path_mask.png").exists()


def test_bad_rows_are_listed_and_the_good_ones_written(project, ray_cluster, tmp_path, capsys):
    ids = ["ok_1", "nul\0byte", "x" * 300, "ok_2", "null_image", "ok_3"]
    images = [png_bytes(3), png_bytes(4), png_bytes(5), png_bytes(6), None, png_bytes(7)]
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}), tmp_path / "rows.parquet")
    status, captured, summary = run(project, tmp_path / "rows.parquet", tmp_path / "out", capsys)
    assert status == 0
    assert "3 of 6 images segmented" in captured.out and "3 failed" in captured.err
    for good in ("ok_1", "ok_2", "ok_3"):
        assert summary[good]["error"] is None and (tmp_path / "out" / f"{good}_mask.png").is_file()
    assert "NUL" in summary["nul\0byte"]["error"]
    assert "255" in summary["x" * 300]["error"]
    assert "not an encoded image" in summary["null_image"]["error"]
    assert "Traceback" not in captured.err


def test_an_int_image_column_is_listed_not_fatal(project, ray_cluster, tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a", "b"], "image": [7, None]}), tmp_path / "ints.parquet")
    status, captured, summary = run(project, tmp_path / "ints.parquet", tmp_path / "out", capsys)
    assert status == 0 and "0 of 2 images segmented" in captured.out
    assert all("not an encoded image" in row["error"] for row in summary.values())


def test_an_actor_keeps_no_scratch_copy_of_the_model(project, ray_cluster, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    weights = ray_cluster.put({name: (project / "ckpt" / name).read_bytes() for name in (MODEL_FILE, META_FILE)})
    segmenter = batch.Segmenter([weights], str(tmp_path / "out"), 0.5, 1, False)
    assert segmenter.model is not None
    assert list(scratch.iterdir()) == []
