"""`fcn predict-batch`: a Ray Data job over a directory or a Parquet file of images, on the local Ray."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from fcn_models import palette
from fcn_models.voc import class_names
from pipelines import cli
from support.checkpoints import checkpoint_mask, make_checkpoint

SIZES = {"a": (45, 61), "b": (30, 40), "nested/c": (33, 27), "nested/d": (64, 50), "e": (21, 77)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    make_checkpoint(root / "ckpt", seed=6, mean_iu=0.5)
    (root / "params.yaml").write_text(yaml.safe_dump({"ray": {"num_workers": 1, "cpus_per_worker": 0.5,
                                                              "data_cpus": 0.5}}))
    images = root / "images"
    rng = np.random.default_rng(2)
    for name, size in SIZES.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{name}.png")
    # Two that fail and one that works though not RGB.
    (images / "not-an-image.jpg").write_text("just text\n")
    jpeg = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(jpeg, "JPEG")
    (images / "nested" / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
    Image.fromarray(rng.integers(0, 256, (26, 34), dtype=np.uint8), "L").save(images / "gray.png")
    return root


def test_a_directory_runs_on_an_actor_pool_and_lists_what_failed(project, ray_cluster, capsys):
    out = project / "out"
    assert cli.main(["predict-batch", str(project / "images"), "--model", str(project / "ckpt"), "--out", str(out),
                     "--actors", "2", "--params", str(project / "params.yaml")]) == 0
    captured = capsys.readouterr()
    assert "6 of 8 images segmented" in captured.out
    assert "2 failed" in captured.err and "not-an-image.jpg: not an image" in captured.err
    assert "truncated.jpg: cannot read the image" in captured.err

    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert [r["image"] for r in summary] == sorted(["a", "b", "e", "gray", "nested/c", "nested/d", "nested/truncated",
                                                    "not-an-image"])
    names = class_names()
    for row in summary:
        if row["image"] in ("not-an-image", "nested/truncated"):
            assert row["error"] and row["mask"] is None and row["share_background"] is None
            assert not (out / f"{row['image']}_mask.png").exists()
            continue
        image = np.asarray(Image.open(project / "images" / f"{row['image']}.png").convert("RGB"))
        expected = checkpoint_mask(project / "ckpt", image)
        assert len(np.unique(expected)) >= 2
        mask = Image.open(out / f"{row['image']}_mask.png")
        assert mask.mode == "P"
        np.testing.assert_array_equal(np.asarray(mask), expected)
        overlay = np.asarray(Image.open(out / f"{row['image']}_overlay.png").convert("RGB"))
        np.testing.assert_array_equal(overlay, palette.overlay(image, expected, alpha=0.5))
        assert row["error"] is None and (row["height"], row["width"]) == image.shape[:2]
        counts = np.bincount(expected.ravel(), minlength=21)
        shares = [row[f"share_{name}"] for name in names]
        np.testing.assert_allclose(shares, 100 * counts / expected.size, rtol=1e-12)


def test_a_parquet_of_encoded_images_names_outputs_by_id(project, ray_cluster, tmp_path):
    rng = np.random.default_rng(8)
    ids, encoded, arrays = [], [], {}
    for i, size in enumerate(((25, 31), (40, 22), (37, 37))):
        arrays[f"img_{i}"] = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(arrays[f"img_{i}"]).save(buffer, "PNG")
        ids.append(f"img_{i}")
        encoded.append(buffer.getvalue())
    pq.write_table(pa.table({"id": ids, "image": encoded}), tmp_path / "images.parquet")
    out = tmp_path / "out"
    assert cli.main(["predict-batch", str(tmp_path / "images.parquet"), "--model", str(project / "ckpt"),
                     "--out", str(out), "--params", str(project / "params.yaml")]) == 0
    summary = {r["image"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert sorted(summary) == ids
    for name, image in arrays.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_mask.png")),
                                      checkpoint_mask(project / "ckpt", image))
        assert summary[name]["error"] is None


def test_bad_sources_name_themselves(project, tmp_path, capsys):
    for source, says in ((tmp_path / "nowhere", "no such directory"), (tmp_path, "holds no image files")):
        assert cli.main(["predict-batch", str(source), "--model", str(project / "ckpt"), "--out",
                         str(tmp_path / "out"), "--params", str(project / "params.yaml")]) == 1
        assert f"{source}: {says}" in capsys.readouterr().err
    pq.write_table(pa.table({"id": ["x"], "pixels": [b"?"]}), tmp_path / "bad.parquet")
    assert cli.main(["predict-batch", str(tmp_path / "bad.parquet"), "--model", str(project / "ckpt"), "--out",
                     str(tmp_path / "out"), "--params", str(project / "params.yaml")]) == 1
    assert "no 'image' column" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_directory_is_held_to_the_params_pixel_limit(project, ray_cluster, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**yaml.safe_load((project / "params.yaml").read_text()),
                                      "inference": {"max_pixels": 1500}}))
    out = tmp_path / "out"
    # a 61x45 (2745 pixels), b 40x30 (1200), e 77x21 (1617), gray 34x26 (884)
    assert cli.main(["predict-batch", str(project / "images" / "*.png"), "--model", str(project / "ckpt"),
                     "--out", str(out), "--actors", "1", "--params", str(params)]) == 0
    assert "2 of 4 images segmented" in capsys.readouterr().out
    summary = {r["image"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert summary["a"]["error"].endswith("61x45 is 2745 pixels, more than the limit of 1500 pixels "
                                          "(inference.max_pixels): scale it down first")
    assert "77x21 is 1617 pixels, more than the limit of 1500 pixels" in summary["e"]["error"]
    assert summary["b"]["error"] is None and summary["gray"]["error"] is None
    assert not (out / "a_mask.png").exists() and (out / "b_mask.png").exists()
