"""`fcn export`: a checkpoint as ONNX with dynamic height and width, run with onnxruntime."""
import numpy as np
import pytest
import torch

from fcn_models.checkpoint import load_checkpoint
from fcn_models.preprocess import normalize
from pipelines import cli
from pipelines.core.files import file_sha256
from pipelines.serve.onnx_export import run_onnx
from support.checkpoints import make_checkpoint

# Sizes the export did not trace (it traces 64 x 96), odd ones among them.
SIZES = ((45, 61), (33, 127), (80, 48))


def torch_scores(checkpoint, image: np.ndarray) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    with torch.no_grad():
        return model(normalize(image, model.input_norm)[None]).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    make_checkpoint(root / "fcn8s", seed=11, mean_iu=0.5)
    assert cli.main(["export", str(root / "fcn8s"), "--onnx", str(root / "out" / "fcn8s.onnx")]) == 0
    return root


@pytest.mark.parametrize("size", SIZES)
def test_onnxruntime_gives_pytorchs_masks_and_scores_at_any_size(exported, size):
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = torch_scores(exported / "fcn8s", image)
    scores, mask = run_onnx(exported / "out" / "fcn8s.onnx", image)
    assert scores.shape == expected.shape == (1, 21, *size) and scores.dtype == np.float32
    assert np.abs(scores - expected).max() <= 1e-4 * np.abs(expected).max()
    assert mask.shape == size and mask.dtype == np.uint8
    truth = expected.argmax(1)[0]
    assert len(np.unique(truth)) >= 2  # several classes, so equal masks mean something
    np.testing.assert_array_equal(mask, truth)


def test_the_onnx_file_names_its_network_and_weights(exported):
    import onnx

    graph = onnx.load(exported / "out" / "fcn8s.onnx")
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["variant"] == "fcn8s" and props["backbone"] == "vgg16" and props["num_classes"] == "21"
    assert props["weights_sha256"] == file_sha256(exported / "fcn8s" / "model.pt")
    assert [i.name for i in graph.graph.input] == ["image"]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["height", "width", 3]
    # Nothing but the file itself was left in the output directory.
    assert [p.name for p in (exported / "out").iterdir()] == ["fcn8s.onnx"]


def test_a_missing_source_names_it_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert cli.main(["export", str(tmp_path / "nothing"), "--onnx", str(out)]) == 1
    assert f"model {tmp_path / 'nothing'}: no such checkpoint directory" in capsys.readouterr().err
    assert not out.exists()


def test_an_onnx_path_under_a_file_names_the_file(exported, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    out = blocker / "sub" / "fcn8s.onnx"
    assert cli.main(["export", str(exported / "fcn8s"), "--onnx", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Errno" not in err, err
    assert f"--onnx {out}: {blocker} is a file, not a directory, so nothing can be written under it" in err
