"""`fcn summary`: per-layer tables and the paper's Table 1 columns."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fcn_models import build_fcn
from fcn_models.summary import (
    count_macs,
    layer_rows,
    main,
    table1_rows,
    time_forward_ms,
)

PAPER = {"alexnet": (57e6, 355, 8), "vgg16": (134e6, 404, 16), "googlenet": (6e6, 907, 22)}


def test_table1_columns_match_the_paper():
    rows = {r["backbone"]: r for r in table1_rows(time_forward=False)}
    assert set(rows) == set(PAPER)
    for backbone, (params, field, conv_layers) in PAPER.items():
        r = rows[backbone]
        assert r["receptive_field"] == field
        assert r["max_stride"] == 32
        assert r["conv_layers"] == conv_layers
        assert abs(r["params"] - params) / params < 0.05
        assert r["forward_ms"] is None


def test_vgg16_layer_table():
    rows = {r["layer"]: r for r in layer_rows("vgg16")}
    assert rows["fc6"]["weights"] == 102_760_448 == 4096 * 512 * 7 * 7
    assert rows["fc6"]["params"] == 102_760_448 + 4096
    assert rows["conv1_1"]["shape"] == (64, 224, 224)
    assert rows["conv1_1"]["activations"] == 64 * 224 * 224
    assert rows["pool5"]["shape"] == (512, 7, 7)
    assert rows["fc7"]["shape"] == (4096, 1, 1) and rows["fc7"]["weights"] == 4096 * 4096
    assert "relu1_1" not in rows and "drop6" not in rows
    # the classifier's parameters, less its 1000-way layer
    assert sum(r["params"] for r in rows.values()) == 138_357_544 - (4096 * 1000 + 1000)


def test_alexnet_and_googlenet_layer_tables():
    alex = {r["layer"]: r for r in layer_rows("alexnet")}
    assert alex["conv1"]["shape"] == (64, 55, 55) and alex["pool5"]["shape"] == (256, 6, 6)
    assert alex["fc6"]["weights"] == 4096 * 256 * 6 * 6 and alex["fc6"]["shape"] == (4096, 1, 1)
    goog = {r["layer"]: r for r in layer_rows("googlenet")}
    assert goog["inception5b"]["shape"] == (1024, 7, 7)
    assert goog["maxpool4"]["shape"] == (832, 7, 7)


def test_summary_cli_prints_tables(capsys):
    assert main(["--backbone", "vgg16"]) == 0
    out = capsys.readouterr().out
    assert "conv1_1 padding 1" in out and "102,760,448" in out
    assert main(["--table1", "--no-time"]) == 0
    out = capsys.readouterr().out
    for name, field in [("FCN-AlexNet", "355"), ("FCN-VGG16", "404"), ("FCN-GoogLeNet", "907")]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert line.split().count(field) == 2  # ours and the paper's
    assert "frozen bilinear upsampling out" in out
    assert main(["--backbone", "googlenet", "--size", "64"]) == 0
    assert "inception5b" in capsys.readouterr().out


def test_summary_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["--backbone", "resnet50"])
    with pytest.raises(SystemExit):
        main(["--repeat", "0"])


def test_forward_timing_runs():
    assert time_forward_ms("alexnet", size=16, repeat=1) > 0


def test_mac_count_agrees_with_torch_flop_counter():
    width, size = 1 / 16, (70, 90)
    model = build_fcn("fcn8s", "vgg16", width=width).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, *size))
    assert 2 * count_macs("fcn8s", "vgg16", *size, model_width=width) == counter.get_total_flops()
