"""`fcn summary`: the per-layer table of a trunk, and the paper's Table 1 columns.

    fcn summary --backbone vgg16      output shape, activations and parameters per layer at 224x224
    fcn summary --table1              parameters, conv layers, receptive field, max stride and
                                      forward time at 500x500 of FCN-AlexNet/VGG16/GoogLeNet

Shapes, parameter counts and multiply-adds come from models built on the meta
device (no memory, no compute); only the forward timing builds real weights.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn as nn

from .backbones import BACKBONES, build_trunk
from .fcn import build_fcn, optimize_for_inference
from .geometry import chain_geometry
from .voc import NUM_CLASSES

# Long, Shelhamer, Darrell, Table 1 (forward time on an NVIDIA K40, 500x500 input).
PAPER_TABLE1 = {
    "alexnet": {"params": 57e6, "conv_layers": 8, "receptive_field": 355, "max_stride": 32, "forward_ms": 50},
    "vgg16": {"params": 134e6, "conv_layers": 16, "receptive_field": 404, "max_stride": 32, "forward_ms": 210},
    "googlenet": {"params": 6e6, "conv_layers": 22, "receptive_field": 907, "max_stride": 32, "forward_ms": 59},
}
DISPLAY_NAMES = {"alexnet": "FCN-AlexNet", "vgg16": "FCN-VGG16", "googlenet": "FCN-GoogLeNet"}
COUNTING_RULE = "score layer in, frozen bilinear upsampling out, 21 classes, BN statistics out"
SKIPPED_IN_TABLE = (nn.ReLU, nn.Dropout)


def cpu_model() -> str:
    """The CPU's model name, for saying what a timing was measured on."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> str:
    """CPU model, cores, torch threads and version: what a timing was measured on."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
        s = layer.stride if isinstance(layer.stride, int) else layer.stride[0]
        kind = {nn.Conv2d: "conv", nn.MaxPool2d: "max pool", nn.AvgPool2d: "avg pool"}[type(layer)]
        return f"{kind} {k}x{k}" + (f" /{s}" if s != 1 else "")
    if hasattr(layer, "conv") and isinstance(layer.conv, nn.Conv2d):
        return _describe(layer.conv) + " + BN"
    return type(layer).__name__.lower()


def layer_rows(backbone: str = "vgg16", size: int = 224) -> list[dict]:
    """One row per trunk layer (activations and dropout left out) for a size x size input,
    with the first convolution padded as in the ImageNet classifier."""
    with torch.device("meta"):
        model = build_fcn("fcn32s", backbone)
        trunk = model.trunk
        first = trunk.get_submodule(trunk.first_conv)
        first.padding = (trunk.classifier_padding,) * 2
        shapes = {}
        hooks = [layer.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
                 for name, layer in trunk.named_children()]
        trunk(torch.zeros(1, 3, size, size), keep=(trunk.score_source,))
        for h in hooks:
            h.remove()
    rows = []
    for name, layer in trunk.named_children():
        if isinstance(layer, SKIPPED_IN_TABLE) or name not in shapes:
            continue
        weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Conv2d))
        rows.append({
            "layer": name, "kind": _describe(layer), "shape": shapes[name],
            "activations": shapes[name][0] * shapes[name][1] * shapes[name][2],
            "weights": weights, "params": sum(p.numel() for p in layer.parameters()),
        })
    return rows


def format_layer_table(backbone: str, size: int = 224) -> str:
    rows = layer_rows(backbone, size)
    with torch.device("meta"):
        trunk = build_trunk(backbone)
    first, pad = trunk.first_conv.split(".")[0], trunk.classifier_padding
    lines = [f"{backbone} trunk at {size}x{size} input, {first} padding {pad} as in the ImageNet "
             f"classifier (the FCN pads it by 100; this table only), fc layers as convolutions", ""]
    header = f"{'layer':<12} {'kind':<18} {'output (C x H x W)':>20} {'activations':>13} {'weights':>13} {'params':>13}"
    lines += [header, "-" * len(header)]
    for r in rows:
        shape = " x ".join(map(str, r["shape"]))
        lines.append(f"{r['layer']:<12} {r['kind']:<18} {shape:>20} {r['activations']:>13,} "
                     f"{r['weights']:>13,} {r['params']:>13,}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<12} {'':<18} {'':>20} {sum(r['activations'] for r in rows):>13,} "
                 f"{sum(r['weights'] for r in rows):>13,} {sum(r['params'] for r in rows):>13,}")
    return "\n".join(lines)


def count_macs(variant: str, backbone: str, height: int, width: int, *, model_width: float = 1.0,
               num_classes: int = NUM_CLASSES) -> int:
    """Multiply-adds of all convolutions and transposed convolutions for one height x width image
    (FLOPs = 2 x MACs), counted from the layer shapes on a meta-device model."""
    total = 0

    def count(m, inputs, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):
            total += inputs[0].numel() * (m.out_channels // m.groups) * k
        else:
            total += out.numel() * (m.in_channels // m.groups) * k

    with torch.device("meta"):
        model = build_fcn(variant, backbone, num_classes, model_width)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.register_forward_hook(count)
        model(torch.zeros(1, 3, height, width))
    return total


def table1_rows(time_forward: bool = True, repeat: int = 3, size: int = 500, compile: bool = False) -> list[dict]:
    """Table 1's columns for FCN-32s on each backbone, computed from our modules."""
    rows = []
    for backbone in ("alexnet", "vgg16", "googlenet"):
        with torch.device("meta"):
            model = build_fcn("fcn32s", backbone, num_classes=NUM_CLASSES)
        trunk = model.trunk
        # The convolutionalised classifier: trunk to the score source, whatever the
        # classifier had after it (GoogLeNet's 7x7 average pool), then the score layer.
        g = chain_geometry([*trunk.layers_until(trunk.score_source), *trunk.classifier_tail, model.score_fr])
        row = {
            "backbone": backbone,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "conv_layers": g.depth,
            "receptive_field": g.receptive_field,
            "max_stride": int(g.stride),
            "forward_ms": None,
        }
        if time_forward:
            row["forward_ms"] = time_forward_ms(backbone, size, repeat, compile)
        rows.append(row)
    return rows


def time_forward_ms(backbone: str, size: int = 500, repeat: int = 3, compile: bool = False) -> float:
    """Median forward time of FCN-32s (batch 1, inference mode) after one warm-up run
    (which, with compile, also compiles)."""
    model = optimize_for_inference(build_fcn("fcn32s", backbone), compile=compile)
    x = torch.randn(1, 3, size, size)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeat):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def format_table1(rows: list[dict], repeat: int, size: int, compile: bool = False) -> str:
    # (group title, ours width, paper width, how to print ours, how to print the paper's)
    columns = [
        ("parameters", 7, 6, lambda r: f"{r['params'] / 1e6:.1f}M", lambda p: f"{p['params'] / 1e6:.0f}M"),
        ("conv layers", 5, 5, lambda r: str(r["conv_layers"]), lambda p: str(p["conv_layers"])),
        ("receptive field", 7, 7, lambda r: str(r["receptive_field"]), lambda p: str(p["receptive_field"])),
        ("max stride", 5, 5, lambda r: str(r["max_stride"]), lambda p: str(p["max_stride"])),
        (f"forward {size}x{size}, ms", 9, 10,
         lambda r: f"{r['forward_ms']:.0f}" if r["forward_ms"] is not None else "-", lambda p: str(p["forward_ms"])),
    ]
    groups = "".join(f"  {title:^{a + b + 1}}" for title, a, b, _, _ in columns).rstrip()
    sub = "".join(f"  {'ours':>{a}} {'paper' if i < 4 else 'paper, K40':>{b}}"
                  for i, (_, a, b, _, _) in enumerate(columns))
    lines = [
        "Table 1 of Long, Shelhamer, Darrell: the convolutionalised nets (FCN-32s), ours vs the paper's",
        f"parameters: {COUNTING_RULE}",
        "receptive field and max stride: computed from the layers (GoogLeNet's counts the classifier's "
        "7x7 average pool, which FCN-GoogLeNet drops)",
        "",
        f"{'':<14}{groups}",
        f"{'':<14}{sub}",
    ]
    for r in rows:
        p = PAPER_TABLE1[r["backbone"]]
        cells = "".join(f"  {ours(r):>{a}} {paper(p):>{b}}" for _, a, b, ours, paper in columns)
        lines.append(f"{DISPLAY_NAMES[r['backbone']]:<14}{cells}")
    lines.append("")
    if any(r["forward_ms"] is not None for r in rows):
        how = "compiled with frozen weights" if compile else "channels-last, eager"
        lines.append(f"forward time: FCN-32s, batch 1, float32, inference mode ({how}), median of {repeat} "
                     f"after a warm-up, on {machine()}")
    else:
        lines.append("forward time: not measured (--no-time)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn summary", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=BACKBONES, default="vgg16", help="trunk for the per-layer table")
    parser.add_argument("--size", type=int, default=224, help="input size of the per-layer table (default 224)")
    parser.add_argument("--table1", action="store_true", help="print the paper's Table 1 columns instead")
    parser.add_argument("--repeat", type=int, default=3, help="timed forward runs per net (default 3)")
    parser.add_argument("--time-size", type=int, default=500, help="input size for the forward timing (default 500)")
    parser.add_argument("--no-time", action="store_true", help="skip the forward timing")
    parser.add_argument("--compile", action="store_true",
                        help="time the nets compiled with frozen weights (faster, plus a build per net)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size < 1 or args.time_size < 1:
        parser.error("--repeat, --size and --time-size must be >= 1")
    if args.table1:
        rows = table1_rows(time_forward=not args.no_time, repeat=args.repeat, size=args.time_size,
                           compile=args.compile)
        print(format_table1(rows, args.repeat, args.time_size, args.compile))
    else:
        print(format_layer_table(args.backbone, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
