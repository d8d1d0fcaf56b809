"""Images that would take the machine down or come out wrong: too many pixels, 16-bit and float pixels.

The pixel limit (inference.max_pixels) holds in predict (checked from the file's
header, before decoding), in the served model (the limit it was registered with)
and in evaluate; `fcn predict --downscale` predicts a large image at a size within
the limit instead. The tiny checkpoints are test_register's.
"""
import struct
import time
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from fcn_models.limits import MAX_PIXELS, fitting_size
from pipelines.serve.images import ImageError, read_image, resized
from pipelines.serve.pyfunc_model import FCNSegmenter
from pipelines.commands import predict
from pipelines.stages import evaluate
from support.checkpoints import checkpoint_mask, make_checkpoint, write_evaluation
from support.stages import one_line, stage
from support.training import WIDTH, write_shards


def png16(path, values: np.ndarray) -> None:
    """A 16-bit grayscale PNG written byte by byte (PIL writes these as I;16 only from mode I;16 arrays)."""
    height, width = values.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def checkpoint(tmp_path):
    make_checkpoint(tmp_path / "ckpt", seed=6, mean_iu=0.5)
    return tmp_path / "ckpt"


def test_sixteen_bit_pngs_are_scaled_to_eight_bits_not_clipped(tmp_path, checkpoint):
    values = np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85  # 0 .. 65195
    png16(tmp_path / "deep.png", values)
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = read_image(tmp_path / "deep.png")
    expected = np.round(values / 257).astype(np.uint8)
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], expected)
    assert (image == 255).mean() < 0.01  # PIL's own conversion made 255 of nearly all of them
    # Predicted as the same picture in 8 bits would be.
    out = tmp_path / "out"
    status, err = stage(predict.main, str(tmp_path / "deep.png"), "--model", str(checkpoint), "--out", str(out))
    assert status == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(out / "deep_mask.png")),
                                  checkpoint_mask(checkpoint, np.repeat(expected[..., None], 3, axis=2)))


def test_float_and_32_bit_images_are_refused_naming_them(tmp_path):
    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 70000).save(tmp_path / "wide.tif")
    with pytest.raises(ImageError, match=r"float\.tif: floating-point pixels \(PIL mode F\)"):
        read_image(tmp_path / "float.tif")
    with pytest.raises(ImageError, match=r"wide\.tif: 32-bit integer pixels \(PIL mode I\)"):
        read_image(tmp_path / "wide.tif")


def test_an_image_above_the_default_limit_is_refused_before_it_is_decoded(tmp_path, checkpoint):
    big = tmp_path / "big.jpg"
    Image.new("L", (6000, 6000), 128).save(big, quality=50)
    started = time.perf_counter()
    status, err = stage(predict.main, str(big), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
                        "--params", str(tmp_path / "none.yaml"))
    assert status == 1
    assert one_line(err) == (f"predict: {big}: 6000x6000 is 36.0 megapixels, more than the limit of 4.2 "
                             f"megapixels ({MAX_PIXELS} pixels) (inference.max_pixels): scale it down first, or "
                             "pass --downscale to predict it at a smaller size")
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 120  # not a forward pass over 36 megapixels (generous on a busy box)


def test_downscale_predicts_within_the_limit_and_scales_the_mask_back(tmp_path, checkpoint, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"inference": {"max_pixels": 1200}}))
    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(4).integers(0, 256, (50, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    out = tmp_path / "out"
    assert predict.main([str(photo), "--model", str(checkpoint), "--out", str(out), "--params", str(params)]) == 1
    assert "64x50 is 3200 pixels, more than the limit of 1200 pixels (inference.max_pixels)" \
        in capsys.readouterr().err

    assert predict.main([str(photo), "--model", str(checkpoint), "--out", str(out), "--params", str(params),
                         "--downscale"]) == 0
    height, width = fitting_size(50, 64, 1200)
    assert height * width <= 1200 and abs(width / height - 64 / 50) < 0.05
    assert f"{photo} (64x50, predicted at {width}x{height})" in capsys.readouterr().out
    small = checkpoint_mask(checkpoint, resized(pixels, (height, width)))
    expected = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((64, 50), Image.Resampling.NEAREST))
    mask = np.asarray(Image.open(out / "photo_mask.png"))
    assert mask.shape == (50, 64) and len(np.unique(expected)) >= 2
    np.testing.assert_array_equal(mask, expected)


def test_the_served_model_keeps_the_limit_it_was_registered_with(checkpoint):
    import json

    meta = json.loads((checkpoint / "meta.json").read_text())
    served = FCNSegmenter().load(checkpoint, device="cpu")
    assert served.max_pixels == MAX_PIXELS
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "max_pixels": 600}))
    served = FCNSegmenter().load(checkpoint, device="cpu")
    assert served.segment(np.zeros((20, 30, 3), np.uint8)).shape == (20, 30)
    with pytest.raises(ValueError, match=r"image of 31x20 is 620 pixels, more than the limit of 600 pixels, "
                                         r"this model's limit"):
        served.segment(np.zeros((20, 31, 3), np.uint8))


def test_a_checkpoint_directory_takes_the_params_limit_not_its_own(tmp_path, checkpoint):
    import json

    # A limit in meta.json (a registered model's checkpoint) below the params' limit.
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "max_pixels": 600}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"inference": {"max_pixels": 4000}}))
    pixels = np.random.default_rng(5).integers(0, 256, (50, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    status, err = stage(predict.main, str(tmp_path / "photo.png"), "--model", str(checkpoint), "--out",
                        str(tmp_path / "out"), "--params", str(params))
    assert status == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "photo_mask.png")),
                                  checkpoint_mask(checkpoint, pixels))


def test_evaluate_refuses_a_val_image_above_the_limit(tmp_path):
    from fcn_models.checkpoint import save_checkpoint
    from fcn_models.fcn import build_fcn

    write_shards(tmp_path / "shards", n_train=1, n_val=2)  # val images of 24 x 32 and 20 x 28
    save_checkpoint(tmp_path / "models" / "fcn8s", build_fcn("fcn8s", width=WIDTH), {"stage": "fcn8s"})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"shards_dir": "shards"}, "model": {"width": WIDTH},
                                      "evaluate": {"stages": ["fcn8s"], "timing_images": 1},
                                      "inference": {"max_pixels": 700}}))
    status, err = stage(evaluate.main, "--params", str(params), "--device", "cpu")
    assert status == 1
    assert one_line(err).startswith(f"evaluate: {tmp_path / 'shards' / 'val' / 'part-00000.parquet'}: sample "
                                    "val_000000: 32x24 is 768 pixels, more than the limit of 700 pixels")
    assert not (tmp_path / "reports").exists()


def test_the_registered_model_refuses_an_image_above_the_limit_it_was_registered_with(tmp_path, monkeypatch):
    import mlflow

    from pipelines.core.params import parse_params
    from pipelines.stages import register
    from pipelines.track import store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "data" / "shards", n_train=1, n_val=2)
    knobs = {"model": {"width": WIDTH}, "inference": {"max_pixels": 700}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(knobs))
    params = parse_params(knobs, root=tmp_path)
    checkpoint = tmp_path / "models" / "fcn8s"
    write_evaluation(params, "fcn8s", checkpoint, make_checkpoint(checkpoint, seed=2, mean_iu=0.5))
    status, err = stage(register.main, "--params", str(tmp_path / "params.yaml"))
    assert status == 0, err
    store.use_store(store.tracking_uri(params))
    served = mlflow.pyfunc.load_model("models:/fcn-voc@champion")
    image = np.random.default_rng(1).integers(0, 256, (20, 35, 3), dtype=np.uint8)  # 700 pixels: allowed
    np.testing.assert_array_equal(served.predict(image), checkpoint_mask(checkpoint, image))
    with pytest.raises(Exception, match=r"image of 36x20 is 720 pixels, more than the limit of 700 pixels"):
        served.predict(np.zeros((20, 36, 3), np.uint8))
