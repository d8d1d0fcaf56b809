"""The generated VOC2012/SBD mirror: layouts, ids, label formats, determinism, learnability."""
import hashlib
import io
import re
import tarfile

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import scipy.sparse
import yaml
from PIL import Image

from pipelines.core.params import parse_params
from pipelines.data import synthetic as demo_data
from pipelines.data.shards import seg11valid_ids
from pipelines.commands import demo_data as demo_data_stage

VOC = "VOCdevkit/VOC2012"
SBD = "benchmark_RELEASE/dataset"
N_TRAIN, N_VAL, MAX_SIDE, SEED = 40, 16, 96, 7
SBD_ID = re.compile(r"^20(08|09|10|11)_\d{6}$")

# Entries of the PASCAL VOC devkit's colour map (VOClabelcolormap), written out.
VOC_COLOURS = {
    0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
    6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 9: (192, 0, 0), 10: (64, 128, 0),
    11: (192, 128, 0), 12: (64, 0, 128), 13: (192, 0, 128), 14: (64, 128, 128), 15: (192, 128, 128),
    16: (0, 64, 0), 17: (128, 64, 0), 18: (0, 192, 0), 19: (128, 192, 0), 20: (0, 64, 128),
    255: (224, 224, 192),
}


class Mirror:
    """A written mirror opened for reading."""

    def __init__(self, result):
        self.result = result
        self.voc = tarfile.open(result["voc"])
        self.sbd = tarfile.open(result["sbd"])

    def read(self, archive, name) -> bytes:
        return getattr(self, archive).extractfile(name).read()

    def ids(self, archive, name) -> list[str]:
        return self.read(archive, name).decode().split()

    def image(self, archive, name) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.read(archive, name))).convert("RGB"))

    def voc_label(self, image_id) -> Image.Image:
        return Image.open(io.BytesIO(self.read("voc", f"{VOC}/SegmentationClass/{image_id}.png")))

    def mat(self, kind, image_id, **kwargs):
        return scipy.io.loadmat(io.BytesIO(self.read("sbd", f"{SBD}/{kind}/{image_id}.mat")), **kwargs)

    def sbd_label(self, image_id) -> np.ndarray:
        return self.mat("cls", image_id, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirror")
    result = demo_data.write_mirror(out, n_train=N_TRAIN, n_val=N_VAL, seed=SEED, max_side=MAX_SIDE, workers=2)
    m = Mirror(result)
    yield m
    m.voc.close()
    m.sbd.close()


def seg11valid() -> list[str]:
    return seg11valid_ids()


def test_result_names_the_archives_and_their_md5s(mirror):
    result = mirror.result
    assert result["voc"].name == "VOCtrainval_11-May-2012.tar"
    assert result["sbd"].name == "benchmark.tgz"
    for key in ("voc", "sbd"):
        assert result["md5"][key] == hashlib.md5(result[key].read_bytes()).hexdigest()
    # Nothing half-written is left beside them.
    assert sorted(p.name for p in result["voc"].parent.iterdir()) == ["VOCtrainval_11-May-2012.tar", "benchmark.tgz"]


def test_archives_have_the_real_layouts(mirror):
    voc_names = set(mirror.voc.getnames())
    sbd_names = set(mirror.sbd.getnames())
    for split in ("train", "val", "trainval"):
        assert f"{VOC}/ImageSets/Segmentation/{split}.txt" in voc_names
    for split in ("train", "val"):
        assert f"{SBD}/{split}.txt" in sbd_names
    for image_id in mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/trainval.txt"):
        assert f"{VOC}/JPEGImages/{image_id}.jpg" in voc_names
        assert f"{VOC}/SegmentationClass/{image_id}.png" in voc_names
    for split in ("train", "val"):
        for image_id in mirror.ids("sbd", f"{SBD}/{split}.txt"):
            for member in (f"img/{image_id}.jpg", f"cls/{image_id}.mat", f"inst/{image_id}.mat"):
                assert f"{SBD}/{member}" in sbd_names
    # Reproducible and safe to extract: relative paths, root-owned, one mtime, sorted.
    for tar in (mirror.voc, mirror.sbd):
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        for m in members:
            assert not m.name.startswith("/") and ".." not in m.name.split("/")
            assert m.isfile() or m.isdir()
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
            assert m.mtime == members[0].mtime
    # The SBD archive is gzip without a stored file name or time.
    header = mirror.result["sbd"].read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b" and header[3] & 0x08 == 0 and header[4:8] == b"\0\0\0\0"


def test_ids_follow_the_real_splits(mirror):
    valid = set(seg11valid())
    sbd_train = mirror.ids("sbd", f"{SBD}/train.txt")
    sbd_val = mirror.ids("sbd", f"{SBD}/val.txt")
    voc_train = mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/train.txt")
    voc_val = mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/val.txt")
    voc_trainval = mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/trainval.txt")

    assert len(sbd_train) == N_TRAIN == len(set(sbd_train))
    assert all(SBD_ID.match(i) for i in sbd_train)
    assert not set(sbd_train) & valid
    # The validation split preprocess derives: seg11valid ids in VOC's val list.
    val = [i for i in voc_val if i in valid]
    assert len(val) == N_VAL
    assert not set(val) & set(sbd_train)
    assert set(sbd_val) <= valid and not set(sbd_val) & set(sbd_train)
    assert sorted(voc_train + voc_val) == voc_trainval
    assert not set(voc_train) & set(voc_val)


def test_voc_labels_are_palette_pngs_with_void_borders(mirror):
    ids = mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/trainval.txt")
    void_next_to_object = 0
    for image_id in ids:
        label = mirror.voc_label(image_id)
        assert label.mode == "P"
        palette = np.asarray(label.getpalette(), np.uint8).reshape(-1, 3)
        for index, colour in VOC_COLOURS.items():
            assert tuple(palette[index]) == colour
        values = np.asarray(label)
        assert set(np.unique(values)) <= set(range(21)) | {255}
        jpeg = mirror.image("voc", f"{VOC}/JPEGImages/{image_id}.jpg")
        assert values.shape == jpeg.shape[:2]
        assert max(values.shape) <= MAX_SIDE
        objects = (values >= 1) & (values <= 20)
        near_object = scipy.ndimage.binary_dilation(objects)
        void_next_to_object += int(((values == 255) & near_object).any())
    assert void_next_to_object == len(ids)


def test_voc_colormap_matches_the_devkit():
    cmap = demo_data.voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    for index, colour in VOC_COLOURS.items():
        assert tuple(cmap[index]) == colour
    assert len({tuple(c) for c in cmap}) == 256


def test_sbd_mats_read_like_the_real_ones(mirror):
    for image_id in mirror.ids("sbd", f"{SBD}/train.txt")[:8]:
        h, w = mirror.image("sbd", f"{SBD}/img/{image_id}.jpg").shape[:2]
        squeezed = mirror.mat("cls", image_id, squeeze_me=True, struct_as_record=False)["GTcls"]
        record = mirror.mat("cls", image_id)["GTcls"][0, 0]
        for seg in (squeezed.Segmentation, record["Segmentation"]):
            assert seg.dtype == np.uint8 and seg.shape == (h, w)
            assert seg.max() <= 20
        np.testing.assert_array_equal(squeezed.Segmentation, record["Segmentation"])
        seg = squeezed.Segmentation
        present = sorted(int(c) for c in np.unique(seg) if c > 0)
        assert present and sorted(np.atleast_1d(squeezed.CategoriesPresent).astype(int).tolist()) == present
        assert record["Boundaries"].shape == (20, 1)
        for c in range(1, 21):
            edge = record["Boundaries"][c - 1, 0]
            assert scipy.sparse.issparse(edge) and edge.shape == (h, w)
            edge = edge.toarray().astype(bool)
            assert edge.any() == (c in present)
            assert (seg[edge] == c).all()

        inst = mirror.mat("inst", image_id, squeeze_me=True, struct_as_record=False)["GTinst"]
        assert inst.Segmentation.dtype == np.uint8 and inst.Segmentation.shape == (h, w)
        categories = np.atleast_1d(inst.Categories).astype(int)
        assert inst.Segmentation.max() == len(categories) >= 1
        boundaries = np.atleast_1d(inst.Boundaries)
        assert len(boundaries) == len(categories)
        for k, category in enumerate(categories, 1):
            assert (seg[inst.Segmentation == k] == category).all()
            assert (inst.Segmentation[boundaries[k - 1].toarray().astype(bool)] == k).all()
        assert ((inst.Segmentation > 0) == (seg > 0)).all()


def test_torchvision_readers_load_the_extracted_archives(mirror, tmp_path):
    """torchvision's VOCSegmentation and SBDataset, written for the real releases, read the mirror."""
    from torchvision.datasets import SBDataset, VOCSegmentation

    mirror.voc.extractall(tmp_path, filter="data")
    mirror.sbd.extractall(tmp_path, filter="data")
    voc = VOCSegmentation(str(tmp_path), year="2012", image_set="val")
    assert len(voc) == len(mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/val.txt"))
    image, target = voc[0]
    assert target.mode == "P" and image.size == target.size

    sbd = SBDataset(str(tmp_path / SBD), image_set="train", mode="boundaries")
    assert len(sbd) == N_TRAIN
    image, boundaries = sbd[0]
    assert boundaries.shape == (20, image.size[1], image.size[0])
    assert boundaries.any()
    image, segmentation = SBDataset(str(tmp_path / SBD), image_set="train", mode="segmentation")[0]
    assert segmentation.size == image.size and 0 < np.asarray(segmentation).max() <= 20


def test_shared_ids_are_the_same_picture_in_both_archives(mirror):
    voc_ids = set(mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/trainval.txt"))
    sbd_ids = set(mirror.ids("sbd", f"{SBD}/train.txt") + mirror.ids("sbd", f"{SBD}/val.txt"))
    shared = sorted(voc_ids & sbd_ids)
    assert len(shared) >= 4
    for image_id in shared:
        assert mirror.read("voc", f"{VOC}/JPEGImages/{image_id}.jpg") == mirror.read("sbd", f"{SBD}/img/{image_id}.jpg")
        voc = np.asarray(mirror.voc_label(image_id))
        sbd = mirror.sbd_label(image_id)
        labelled = voc != 255
        np.testing.assert_array_equal(voc[labelled], sbd[labelled])


def test_every_class_appears_and_images_vary_in_size(mirror):
    seen_train, seen_val, sizes = set(), set(), set()
    for image_id in mirror.ids("sbd", f"{SBD}/train.txt"):
        label = mirror.sbd_label(image_id)
        seen_train |= set(np.unique(label).tolist())
        sizes.add(label.shape)
    valid = set(seg11valid())
    for image_id in mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/val.txt"):
        if image_id in valid:
            seen_val |= set(np.unique(np.asarray(mirror.voc_label(image_id))).tolist())
    assert seen_train == set(range(21))
    assert seen_val == set(range(21)) | {255}
    assert len(sizes) >= 3
    assert all(max(s) == MAX_SIDE and min(s) >= round(0.6 * MAX_SIDE) for s in sizes)
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)


def test_colour_alone_separates_classes_only_partly(mirror):
    """A nearest-class-colour-mean pixel classifier: far above chance, far from perfect."""
    pixels, labels = [], []
    for image_id in mirror.ids("sbd", f"{SBD}/train.txt"):
        pixels.append(mirror.image("sbd", f"{SBD}/img/{image_id}.jpg").reshape(-1, 3))
        labels.append(mirror.sbd_label(image_id).ravel())
    pixels, labels = np.concatenate(pixels).astype(np.float64), np.concatenate(labels)
    means = np.stack([pixels[labels == c].mean(0) for c in range(21)])

    valid = set(seg11valid())
    val_pixels, val_labels = [], []
    for image_id in mirror.ids("voc", f"{VOC}/ImageSets/Segmentation/val.txt"):
        if image_id in valid:
            val_pixels.append(mirror.image("voc", f"{VOC}/JPEGImages/{image_id}.jpg").reshape(-1, 3))
            val_labels.append(np.asarray(mirror.voc_label(image_id)).ravel())
    val_pixels, val_labels = np.concatenate(val_pixels).astype(np.float64), np.concatenate(val_labels)
    keep = val_labels != 255
    val_pixels, val_labels = val_pixels[keep], val_labels[keep].astype(int)
    predicted = ((val_pixels[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)

    confusion = np.bincount(val_labels * 21 + predicted, minlength=21 * 21).reshape(21, 21)
    class_acc = np.diag(confusion) / confusion.sum(1)
    pixel_acc = np.diag(confusion).sum() / confusion.sum()
    # Chance is 1/21 per class. Measured on this mirror: mean class accuracy 0.84,
    # pixel accuracy 0.58, background 0.48 (grey clutter is many colours, so that
    # is where colour alone fails), median object class 0.9; seeds 1-3 gave
    # 0.80-0.84 mean class and 0.40-0.51 pixel accuracy.
    assert 0.6 < np.nanmean(class_acc) < 0.95
    assert 0.3 < pixel_acc < 0.8
    assert class_acc[0] < 0.7
    assert np.median(class_acc[1:]) > 0.6


def test_same_parameters_give_identical_archives(tmp_path, mirror):
    serial = demo_data.write_mirror(tmp_path / "serial", n_train=N_TRAIN, n_val=N_VAL, seed=SEED,
                                    max_side=MAX_SIDE, workers=1)
    assert serial["md5"] == mirror.result["md5"]
    other_seed = demo_data.write_mirror(tmp_path / "other", n_train=N_TRAIN, n_val=N_VAL, seed=SEED + 1,
                                        max_side=MAX_SIDE, workers=1)
    assert other_seed["md5"]["voc"] != mirror.result["md5"]["voc"]
    assert other_seed["md5"]["sbd"] != mirror.result["md5"]["sbd"]


def test_an_image_depends_only_on_seed_and_id():
    first = demo_data.render_image(3, "2009_001234", [2, 5, 19], 120, 72)
    again = demo_data.render_image(3, "2009_001234", [2, 5, 19], 120, 72)
    other = demo_data.render_image(3, "2009_001235", [2, 5, 19], 120, 72)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


def test_object_crops_depend_only_on_seed_split_and_index():
    image, label = demo_data.object_crop(3, "train", 17, 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and 1 <= label <= 20
    again = demo_data.object_crop(3, "train", 17, 48)
    np.testing.assert_array_equal(image, again[0])
    assert label == again[1]
    for other in [(3, "train", 18), (3, "heldout", 17), (4, "train", 17)]:
        assert not np.array_equal(image, demo_data.object_crop(*other, 48)[0]), other
    images, labels = demo_data.object_crops(3, "train", 16, 3, 48)
    np.testing.assert_array_equal(images[1], image)
    assert images.shape == (3, 48, 48, 3) and labels.dtype == np.int64 and labels[1] == label


def test_object_crops_are_no_mirror_pictures_and_cover_every_class():
    # A mirror's ids are years 2007-2011 (seg11valid and the SBD-style training ids).
    mirror_years = {int(i[:4]) for i in seg11valid_ids()} | set(demo_data.TRAIN_YEARS)
    assert not mirror_years & set(demo_data.CROP_YEARS.values())
    assert len(set(demo_data.CROP_YEARS.values())) == len(demo_data.CROP_YEARS)
    _, labels = demo_data.object_crops(0, "heldout", 0, 200, 16)
    counts = np.bincount(labels, minlength=21)[1:]
    assert counts.min() >= 3 and counts.max() <= 4 * counts.min(), counts


def test_object_crop_arguments_name_the_value():
    with pytest.raises(ValueError, match="split 'val'.*train, heldout"):
        demo_data.object_crop(0, "val", 0, 32)
    with pytest.raises(ValueError, match="index 1000000.*1000000"):
        demo_data.object_crop(0, "train", 10 ** 6, 32)


def test_void_band_spares_objects_in_front():
    instances = np.zeros((9, 9), np.uint8)
    instances[2:7, 2:7] = 1      # a square behind
    instances[4, 0:9] = 2        # a thin bar in front of it
    void = demo_data.void_band(instances, 1)
    assert not void[instances == 2].any()
    assert void[3, 3] and void[5, 5]  # square pixels next to the bar
    assert void[1, 3] and void[3, 1]  # background next to the square
    assert not void[0, 0] and not void[2, 4] and not void[6, 4]  # two pixels from anything in front


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="n_val = 737.*736"):
        demo_data.write_mirror(tmp_path, n_train=2, n_val=737)
    with pytest.raises(ValueError, match="max_side = 8"):
        demo_data.write_mirror(tmp_path, n_train=2, n_val=2, max_side=8)
    with pytest.raises(ValueError, match="min_side = 90"):
        demo_data.write_mirror(tmp_path, n_train=2, n_val=2, max_side=64, min_side=90)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_paths_md5s_and_a_params_snippet(tmp_path, capsys):
    out = tmp_path / "mirror"
    rc = demo_data_stage.main(["--out", str(out), "--train", "5", "--val", "3", "--seed", "1", "--max-side", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    voc_md5 = hashlib.md5((out / "VOCtrainval_11-May-2012.tar").read_bytes()).hexdigest()
    sbd_md5 = hashlib.md5((out / "benchmark.tgz").read_bytes()).hexdigest()
    assert f"{out / 'VOCtrainval_11-May-2012.tar'}  md5 {voc_md5}" in printed
    assert f"{out / 'benchmark.tgz'}  md5 {sbd_md5}" in printed
    snippet = printed[printed.index("data:\n"):]
    data = parse_params(yaml.safe_load(snippet), "snippet").data
    assert data.local_dir == str(out.resolve())
    assert (data.voc.filename, data.voc.md5, data.voc.mirrors) == ("VOCtrainval_11-May-2012.tar", voc_md5, [])
    assert (data.sbd.filename, data.sbd.md5, data.sbd.mirrors) == ("benchmark.tgz", sbd_md5, [])


def test_cli_rejects_bad_counts(tmp_path, capsys):
    rc = demo_data_stage.main(["--out", str(tmp_path), "--train", "5", "--val", "1000"])
    assert rc == 2
    assert "n_val = 1000" in capsys.readouterr().err
