import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
import yaml
from PIL import Image

from pipelines.data.build_shards import PreprocessError, preprocess
from pipelines.data.rawdata import split_ids
from pipelines.data.shards import SEG11VALID_FILE as SEG11VALID
from pipelines.data.shards import ShardError
from pipelines.data.shards import read_id_list as read_ids
from pipelines.data.synthetic import write_mirror
from pipelines.stages.preprocess import main

N_TRAIN, N_VAL = 16, 8
EXPECTED_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("image", pa.binary()), ("label", pa.binary()),
    ("height", pa.int32()), ("width", pa.int32()),
])


@pytest.fixture(scope="module")
def mirror_raw(tmp_path_factory) -> Path:
    """A generated mirror, extracted the way fetch lays it out: raw/VOCdevkit, raw/benchmark_RELEASE."""
    base = tmp_path_factory.mktemp("mirror")
    archives = write_mirror(base / "archives", n_train=N_TRAIN, n_val=N_VAL, seed=3, max_side=96, workers=1)
    raw = base / "raw"
    for key in ("voc", "sbd"):
        with tarfile.open(archives[key]) as tar:
            tar.extractall(raw, filter="data")
    return raw


@pytest.fixture
def raw(mirror_raw, tmp_path) -> Path:
    """A private copy of the extracted mirror, free to damage."""
    return Path(shutil.copytree(mirror_raw, tmp_path / "raw"))


def run(raw: Path, out: Path, **options) -> dict:
    options.setdefault("workers", 1)
    return preprocess(raw, out / "shards", out / "stats.json", out / "rejected.json", **options)


def read_split(shards: Path) -> pa.Table:
    files = sorted(shards.glob("part-*.parquet"))
    assert files, f"no shards in {shards}"
    return pa.concat_tables(pq.read_table(f) for f in files)


def file_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def voc_dir(raw: Path) -> Path:
    return raw / "VOCdevkit" / "VOC2012"


def sbd_dir(raw: Path) -> Path:
    return raw / "benchmark_RELEASE" / "dataset"


def mat_label(path: Path) -> np.ndarray:
    # the plain loadmat layout, independent of the squeeze_me reading the stage uses
    return scipy.io.loadmat(path)["GTcls"][0, 0]["Segmentation"]


# ----------------------------------------------------------------------------- splits

def test_val_is_seg11valid_within_voc_val_and_train_is_sbd_train(raw):
    voc_val_file = voc_dir(raw) / "ImageSets" / "Segmentation" / "val.txt"
    listed = read_ids(voc_val_file)
    dropped = next(i for i in listed if i in set(read_ids(SEG11VALID)))
    # an id VOC lists but seg11valid does not, and a seg11valid id VOC no longer lists
    voc_val_file.write_text("\n".join([i for i in listed if i != dropped] + ["2012_999999"]) + "\n")

    splits = split_ids(raw)

    seg11valid = set(SEG11VALID.read_text().split())
    voc_val = set(voc_val_file.read_text().split())
    assert splits.val == sorted(seg11valid & voc_val)
    assert len(splits.val) == N_VAL - 1
    assert dropped not in splits.val and "2012_999999" not in splits.val
    # VOC's val list also names SBD training ids (as the real one does): they stay in train only
    assert voc_val - seg11valid - {"2012_999999"}, "the mirror should list some non-seg11valid ids"
    assert splits.train == sorted((sbd_dir(raw) / "train.txt").read_text().split())
    assert len(splits.train) == N_TRAIN
    assert splits.seg11valid_count == 736


def test_train_and_val_overlap_is_an_error(raw):
    val_id = split_ids(raw).val[0]
    with open(sbd_dir(raw) / "train.txt", "a") as fh:
        fh.write(val_id + "\n")
    with pytest.raises(ShardError, match=rf"1 ids are both in SBD train.*{val_id}"):
        split_ids(raw)


def test_ids_that_are_not_plain_names_are_refused(raw):
    with open(sbd_dir(raw) / "train.txt", "a") as fh:
        fh.write("../../etc/passwd\n")
    with pytest.raises(ShardError, match=rf"train\.txt:{N_TRAIN + 1}: '\.\./\.\./etc/passwd'"):
        split_ids(raw)


def test_missing_raw_tree_says_to_fetch_first(tmp_path):
    with pytest.raises(ShardError, match="split list not found.*fcn fetch"):
        run(tmp_path / "nothing", tmp_path)


# ----------------------------------------------------------------------------- shards

def test_shards_follow_the_contract(raw, tmp_path):
    stats = run(raw, tmp_path)
    splits = split_ids(raw)

    for split, ids, source in (("train", splits.train, "sbd"), ("val", splits.val, "voc")):
        table = read_split(tmp_path / "shards" / split)
        assert table.schema.remove_metadata() == EXPECTED_SCHEMA
        assert table.column("id").to_pylist() == ids  # every id, sorted
        assert set(table.column("source").to_pylist()) == {source}
        for row in table.to_pylist():
            if split == "train":
                image_file = sbd_dir(raw) / "img" / f"{row['id']}.jpg"
                truth = mat_label(sbd_dir(raw) / "cls" / f"{row['id']}.mat")
            else:
                image_file = voc_dir(raw) / "JPEGImages" / f"{row['id']}.jpg"
                with Image.open(voc_dir(raw) / "SegmentationClass" / f"{row['id']}.png") as png:
                    assert png.mode == "P"
                    truth = np.asarray(png)
            assert row["image"] == image_file.read_bytes()  # the original JPEG, not re-encoded
            with Image.open(io.BytesIO(row["label"])) as label:
                assert label.format == "PNG" and label.mode == "L"
                np.testing.assert_array_equal(np.asarray(label), truth)
            with Image.open(image_file) as image:
                assert (row["width"], row["height"]) == image.size
        assert stats[split]["images"] == len(ids)
    # the mirror's VOC labels carry a void band, SBD's none
    assert stats["val"]["void_pixels"] > 0 and stats["train"]["void_pixels"] == 0
    assert json.loads((tmp_path / "rejected.json").read_text()) == []


def test_stats_count_the_label_pixels(raw, tmp_path):
    stats = run(raw, tmp_path)
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    splits = split_ids(raw)
    labels = {
        "train": [mat_label(sbd_dir(raw) / "cls" / f"{i}.mat") for i in splits.train],
        "val": [np.asarray(Image.open(voc_dir(raw) / "SegmentationClass" / f"{i}.png")) for i in splits.val],
    }
    for split, maps in labels.items():
        counts = sum(np.bincount(m.ravel(), minlength=256) for m in maps)
        s = stats[split]
        assert list(s["class_pixels"].values()) == counts[:21].tolist()
        assert list(s["class_pixels"])[:2] == ["background", "aeroplane"]
        assert s["void_pixels"] == counts[255]
        assert s["pixels"] == sum(m.size for m in maps)
        np.testing.assert_allclose(list(s["class_frequency"].values()), counts[:21] / counts[:21].sum(), atol=1e-6)
        assert s["void_fraction"] == pytest.approx(counts[255] / counts.sum(), abs=1e-6)
        assert s["height"] == {"min": min(m.shape[0] for m in maps), "max": max(m.shape[0] for m in maps)}
        assert s["width"] == {"min": min(m.shape[1] for m in maps), "max": max(m.shape[1] for m in maps)}
        assert s["rejected"] == 0 and s["shards"] == 1
    assert stats["train"]["listed"] == N_TRAIN
    assert stats["val"]["listed"] == 736


def test_same_inputs_give_byte_identical_files_whatever_the_worker_count(raw, tmp_path):
    run(raw, tmp_path / "a", workers=2, shard_max_bytes=60_000)
    run(raw, tmp_path / "b", workers=1, shard_max_bytes=60_000)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert len([name for name in a if name.endswith(".parquet")]) > 2
    assert a == b


def test_shards_stay_within_the_size_bound(raw, tmp_path):
    run(raw, tmp_path / "one")
    whole = read_split(tmp_path / "one" / "shards" / "train")
    row_bytes = [len(r["image"]) + len(r["label"]) for r in whole.select(["image", "label"]).to_pylist()]
    bound = sum(row_bytes) // 4

    stats = run(raw, tmp_path / "many", shard_max_bytes=bound)

    files = sorted((tmp_path / "many" / "shards" / "train").glob("part-*.parquet"))
    assert len(files) >= 4
    assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(len(files))]
    for f in files:
        assert f.stat().st_size <= bound + max(row_bytes)
    assert stats["train"]["shards"] == len(files)
    assert read_split(tmp_path / "many" / "shards" / "train").equals(whole)


def test_a_failed_run_leaves_the_previous_output_alone(raw, tmp_path):
    out = tmp_path / "out"
    run(raw, out)
    before = file_hashes(out)
    victim = split_ids(raw).train[-1]
    (sbd_dir(raw) / "img" / f"{victim}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PreprocessError, match=victim):
        run(raw, out)
    assert file_hashes(out) == before
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["train", "val"]  # no temp dirs left


# ----------------------------------------------------------------------------- bad samples

def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path):
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)


def _shrink_png(path: Path):
    with Image.open(path) as png:
        png.crop((0, 0, png.width - 3, png.height)).save(path)


def _png_value_42(path: Path):
    with Image.open(path) as png:
        values = np.asarray(png).copy()
        palette = png.getpalette()
    values[0, 0] = 42
    out = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
    out.putpalette(palette)
    out.save(path)


def _mat_value_42(path: Path):
    gt = scipy.io.loadmat(path)["GTcls"][0, 0]
    segmentation = gt["Segmentation"].copy()
    segmentation[-1, -1] = 42
    scipy.io.savemat(path, {"GTcls": {"Segmentation": segmentation, "Boundaries": gt["Boundaries"],
                                      "CategoriesPresent": gt["CategoriesPresent"]}})


def _delete(path: Path):
    path.unlink()


# (split, which file, damage, words the reason must contain)
BAD_SAMPLES = {
    "truncated jpeg": ("train", "image", _truncate, "image does not decode"),
    "garbage jpeg": ("val", "image", _garbage, "image does not decode"),
    "label of another size": ("val", "label", _shrink_png, "but the image is"),
    "label value 42 (png)": ("val", "label", _png_value_42, "42 (1 px)"),
    "label value 42 (mat)": ("train", "label", _mat_value_42, "42 (1 px)"),
    "corrupt .mat": ("train", "label", _truncate, "label .mat has no readable GTcls.Segmentation"),
    "missing image": ("train", "image", _delete, "missing image file"),
    "missing label (png)": ("val", "label", _delete, "missing label file"),
    "missing label (mat)": ("train", "label", _delete, "missing label file"),
}


def _plant(raw: Path, case: str) -> tuple[str, str, Path, str]:
    split, which, damage, reason = BAD_SAMPLES[case]
    splits = split_ids(raw)
    victim = (splits.train if split == "train" else splits.val)[1]
    if split == "train":
        path = sbd_dir(raw) / ("img" if which == "image" else "cls") / f"{victim}.{'jpg' if which == 'image' else 'mat'}"
    else:
        path = voc_dir(raw) / ("JPEGImages" if which == "image" else "SegmentationClass") / \
            f"{victim}.{'jpg' if which == 'image' else 'png'}"
    damage(path)
    return split, victim, path, reason


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_a_bad_sample_is_an_error_naming_id_file_and_problem(raw, tmp_path, case):
    split, victim, path, reason = _plant(raw, case)
    with pytest.raises(PreprocessError) as err:
        run(raw, tmp_path)
    message = str(err.value)
    assert f"{split} sample {victim}" in message
    assert str(path) in message
    assert reason in message
    assert "on_bad_sample: skip" in message
    assert not (tmp_path / "shards" / split).exists()
    assert not (tmp_path / "stats.json").exists()


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_a_bad_sample_is_skipped_and_listed_when_asked(raw, tmp_path, case):
    split, victim, path, reason = _plant(raw, case)
    stats = run(raw, tmp_path, on_bad_sample="skip")

    rejected = json.loads((tmp_path / "rejected.json").read_text())
    assert len(rejected) == 1
    assert rejected[0]["split"] == split and rejected[0]["id"] == victim
    assert rejected[0]["file"] == str(path.relative_to(raw))
    assert reason in rejected[0]["reason"]
    ids = read_split(tmp_path / "shards" / split).column("id").to_pylist()
    assert victim not in ids
    assert len(ids) == (N_TRAIN if split == "train" else N_VAL) - 1
    assert stats[split]["rejected"] == 1
    assert stats[split]["images"] == len(ids)


# ----------------------------------------------------------------------------- main

def _params(path: Path, **data) -> Path:
    path.write_text(yaml.safe_dump({"data": {"raw_dir": "raw", "shards_dir": "out/shards",
                                             "stats_file": "out/stats.json", "rejected_file": "out/rejected.json",
                                             "workers": 1, **data}}))
    return path


def test_main_reads_paths_relative_to_the_params_file(raw, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir("/")
    assert main(["--params", str(_params(tmp_path / "params.yaml"))]) == 0
    out = capsys.readouterr().out
    assert f"val: {N_VAL} of 736 seg11valid ids" in out
    assert f"train: {N_TRAIN}/{N_TRAIN} images" in out
    assert read_split(tmp_path / "out" / "shards" / "val").num_rows == N_VAL
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["train"]["images"] == N_TRAIN


def test_main_reports_a_bad_sample_and_fails(raw, tmp_path, capsys):
    split, victim, path, reason = _plant(raw, "missing image")
    assert main(["--params", str(_params(tmp_path / "params.yaml"))]) == 1
    assert f"sample {victim}: {path}: missing image file" in capsys.readouterr().err
    assert main(["--params", str(_params(tmp_path / "params.yaml", on_bad_sample="skip"))]) == 0


def test_main_rejects_bad_params_by_key(tmp_path, capsys):
    assert main(["--params", str(_params(tmp_path / "params.yaml", on_bad_sample="ignore"))]) == 2
    assert "data.on_bad_sample" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what a run leaves behind

def test_the_same_bad_samples_give_the_same_rejected_file(raw, tmp_path):
    """Reasons carry no object addresses (PIL names the bytes it was given as <_io.BytesIO object at 0x...>)."""
    splits = split_ids(raw)
    (voc_dir(raw) / "JPEGImages" / f"{splits.val[0]}.jpg").write_bytes(b"not an image at all")
    (sbd_dir(raw) / "cls" / f"{splits.train[0]}.mat").write_bytes(b"not a mat file either" * 8)
    (sbd_dir(raw) / "img" / f"{splits.train[1]}.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    run(raw, tmp_path / "first", on_bad_sample="skip", workers=2)
    run(raw, tmp_path / "second", on_bad_sample="skip", workers=1)
    first = (tmp_path / "first" / "rejected.json").read_bytes()
    assert first == (tmp_path / "second" / "rejected.json").read_bytes()
    reasons = {r["id"]: r["reason"] for r in json.loads(first)}
    assert len(reasons) == 3 and not any("0x" in reason for reason in reasons.values()), reasons
    assert reasons[splits.val[0]] == "image does not decode: not an image file PIL can identify"


def test_a_killed_runs_temp_folder_is_removed_at_the_next_start_and_never_names_a_run(raw, tmp_path, capsys):
    from pipelines.core.params import parse_params
    from pipelines.train import recipe

    out = tmp_path / "out"
    run(raw, out)
    before = file_hashes(out / "shards")
    params = parse_params({"data": {"shards_dir": str(out / "shards")}, "model": {"imagenet_weights": None}})
    init = recipe.resolve_init(params, "fcn32s")
    name = recipe.run_name(params, "fcn32s", init, tmp_path)
    # What a run killed (SIGKILL, no clean-up) while writing train leaves: its temp dir, half full.
    stale = out / "shards" / ".train.tmp-4194000"
    shutil.copytree(out / "shards" / "train", stale)
    (stale / "part-00001.parquet").write_bytes(b"half a shard")
    # Training would resume the same run: only the split's part-*.parquet files decide the name.
    assert recipe.run_name(params, "fcn32s", init, tmp_path) == name
    run(raw, out)
    assert f"removing leftover {stale}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["train", "val"]
    assert file_hashes(out / "shards") == before
