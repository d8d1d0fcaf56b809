"""`fcn predict`: masks and overlays from a checkpoint directory or a registered model, and clear errors."""
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from fcn_models import palette
from fcn_models.voc import class_names
from pipelines import cli
from pipelines.core.params import parse_params
from pipelines.commands import predict
from pipelines.stages import register as register_stage
from support.checkpoints import checkpoint_mask, make_checkpoint, write_evaluation
from support.training import WIDTH, write_shards


def rgb(path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def printed_shares(out: str) -> dict:
    """{image line: {class name: percent}} from predict's printout."""
    blocks, current = {}, None
    for line in out.splitlines():
        share = re.fullmatch(r"  (\S+)\s+(\d+\.\d\d)%", line)
        if share:
            blocks[current][share[1]] = float(share[2])
        else:
            current = line.split(" (")[0]
            blocks[current] = {}
    return blocks


def expected_shares(mask: np.ndarray) -> dict:
    names = class_names()
    ids, counts = np.unique(mask, return_counts=True)
    return {names[i]: round(100 * c / mask.size, 2) for i, c in zip(ids, counts)}


@pytest.fixture
def images(tmp_path):
    """Three images of sizes no checkpoint saw: RGB PNG, JPEG, and a grayscale PNG."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (33, 27), dtype=np.uint8), "L").save(folder / "gray.png")
    return [folder / "noise.png", folder / "photo.jpg", folder / "gray.png"]


@pytest.fixture
def checkpoint(tmp_path):
    make_checkpoint(tmp_path / "ckpt", seed=6, mean_iu=0.5)
    return tmp_path / "ckpt"


def test_checkpoint_masks_overlays_and_class_shares(images, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict.main([*map(str, images), "--model", str(checkpoint), "--out", str(out), "--alpha", "0.4"]) == 0
    shares = printed_shares(capsys.readouterr().out)
    assert list(shares) == [str(i) for i in images]
    for image_file in images:
        image = rgb(image_file)  # the grayscale one as RGB, as predict reads it
        expected = checkpoint_mask(checkpoint, image)
        assert len(np.unique(expected)) >= 2
        mask_png = Image.open(out / f"{image_file.stem}_mask.png")
        # Pixel values are the class ids; the palette gives the VOC colours.
        assert mask_png.mode == "P"
        np.testing.assert_array_equal(np.asarray(mask_png), expected)
        np.testing.assert_array_equal(rgb(out / f"{image_file.stem}_mask.png"), palette.colorize(expected))
        np.testing.assert_array_equal(rgb(out / f"{image_file.stem}_overlay.png"),
                                      palette.overlay(image, expected, alpha=0.4))
        # Only classes present, percentages of all pixels.
        assert shares[str(image_file)] == pytest.approx(expected_shares(expected), abs=0.006)
        assert sum(shares[str(image_file)].values()) == pytest.approx(100, abs=0.1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{i.stem}_{kind}.png" for i in images for kind in ("mask", "overlay"))


# --------------------------------------------------------------------------- the registry

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project directory whose params.yaml names its SQLite store, with one registered version."""
    root = tmp_path_factory.mktemp("project")
    write_shards(root / "data" / "shards", n_train=2, n_val=2)
    (root / "params.yaml").write_text(yaml.safe_dump({"model": {"width": WIDTH}}))
    scores = make_checkpoint(root / "models" / "fcn8s", seed=7, mean_iu=0.6)
    write_evaluation(parse_params({}, root=root), "fcn8s", root / "models" / "fcn8s", scores)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert register_stage.main(["--params", str(root / "params.yaml")]) == 0
        yield root


def test_champion_by_default_from_the_params_store(project, images, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # No --model: models:/fcn-voc@champion; no --out: the current directory.
    assert cli.main(["predict", str(images[0]), "--params", str(project / "params.yaml")]) == 0
    expected = checkpoint_mask(project / "models" / "fcn8s", rgb(images[0]))
    np.testing.assert_array_equal(np.asarray(Image.open(elsewhere / "noise_mask.png")), expected)
    assert (elsewhere / "noise_overlay.png").is_file()
    assert printed_shares(capsys.readouterr().out)[str(images[0])] == pytest.approx(expected_shares(expected),
                                                                                   abs=0.006)


@pytest.mark.parametrize("uri, says", [
    ("models:/no-such-model@champion", "no-such-model"),
    ("models:/fcn-voc@no-such-alias", "no-such-alias"),
])
def test_unknown_registered_model_or_alias(project, images, tmp_path, monkeypatch, capsys, uri, says):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    assert predict.main([str(images[0]), "--model", uri, "--out", str(out),
                         "--params", str(project / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert uri in err and says in err and str(project / "mlflow.db") in err
    assert not out.exists()


def test_no_store_is_an_error_not_a_new_empty_store(images, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"width": WIDTH}}))
    assert predict.main([str(images[0]), "--out", str(tmp_path / "out"),
                         "--params", str(tmp_path / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "models:/fcn-voc@champion" in err and f"no MLflow store at {tmp_path / 'mlflow.db'}" in err
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- bad input

def _truncated_jpeg(path):
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("make, says", [
    (None, "no such file"),
    (lambda p: p.write_text("not pixels\n"), "not an image"),
    (lambda p: p.mkdir(), "not a file"),
    (_truncated_jpeg, "cannot read the image"),
])
def test_bad_image_names_the_file_and_writes_nothing(images, checkpoint, tmp_path, capsys, make, says):
    bad = tmp_path / "bad.jpg"
    if make:
        make(bad)
    out = tmp_path / "out"
    # The good image comes first: every image is checked before anything is written.
    assert cli.main(["predict", str(images[0]), str(bad), "--model", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: {says}" in err
    assert not out.exists()


def test_bad_model_directory_names_it(images, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-checkpoint"
    assert predict.main([str(images[0]), "--model", str(missing), "--out", str(out)]) == 1
    assert f"model {missing}: no such checkpoint directory" in capsys.readouterr().err

    (checkpoint / "model.pt").unlink()
    assert predict.main([str(images[0]), "--model", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "model.pt is missing" in err

    (checkpoint / "model.pt").write_bytes(b"not a state dict")
    assert predict.main([str(images[0]), "--model", str(checkpoint), "--out", str(out)]) == 1
    assert f"model {checkpoint}" in capsys.readouterr().err
    assert not out.exists()


def test_an_out_directory_under_a_file_names_the_file(images, checkpoint, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    out = blocker / "masks"
    assert predict.main([str(images[0]), "--model", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Errno" not in err, err
    assert f"--out {out}: {blocker} is a file, not a directory, so nothing can be written under it" in err
    assert blocker.read_text() == "a file"


def test_two_images_with_one_name_would_collide(images, checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    twin = other / images[0].name
    twin.write_bytes(images[0].read_bytes())
    assert predict.main([str(images[0]), str(twin), "--model", str(checkpoint),
                         "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(images[0]) in err and str(twin) in err and "noise_mask.png" in err
