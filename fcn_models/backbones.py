"""The trunks: VGG16, AlexNet (torchvision's and Caffe's) and GoogLeNet made fully convolutional.

Each trunk is the ImageNet classifier with its fully connected layers turned
into convolutions (fc6 a k x k convolution with no padding, fc7 1 x 1) and the
FCN paper's two changes: the first convolution is padded by 100 so that every
input size, down to 1 x 1, still yields an output that covers the image, and
max pooling rounds up (ceil mode), as Caffe does.

A trunk is an nn.Sequential of named layers (the reference's names, so weights
map by name) plus plain data: `taps` maps an output stride to the layer whose
output the FCN reads at that stride (32: the score source; 16 and 8: the skip
taps where the trunk has them), and `torchvision_names` maps layer names to the
module names of torchvision's classifier, for weight surgery.

`width` scales every channel count of the trunk and fc layers (same layers,
fewer channels): channels = max(1, round(c * width)).
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from .limits import MAX_WIDTH
from .norms import BACKBONE_NORMS, InputNorm

FIRST_CONV_PADDING = 100


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def init_from_scratch(layers) -> None:
    """Initialise convolutions as torchvision's VGG does when it trains from scratch:
    Kaiming normal (fan_out, ReLU), zero bias. PyTorch's default init shrinks the
    activations several-fold at every layer, so a deep trunk without normalisation
    hands its score layer almost nothing and learns only background."""
    for layer in layers:
        # Meta tensors (shape-only builds, e.g. for importing weights) hold no values to set,
        # and random init on the meta device is slow (a Python decomposition).
        if isinstance(layer, nn.Conv2d) and not layer.weight.is_meta:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)


class Trunk(nn.Sequential):
    """Named layers run in order; `forward(x, keep)` returns the outputs of the layers named in keep."""

    def __init__(self, layers: "OrderedDict[str, nn.Module]", *, name: str, taps: dict[int, str],
                 tap_channels: dict[int, int], first_conv: str, classifier_padding: int,
                 imagenet_norm: InputNorm, torchvision_names: dict[str, str],
                 torchvision_dropped: tuple[str, ...], torchvision_smaller_kernels: tuple[str, ...] = (),
                 classifier_tail: tuple[nn.Module, ...] = ()):
        super().__init__(layers)
        self.name = name
        self.taps = dict(taps)
        self.tap_channels = dict(tap_channels)
        self.first_conv = first_conv
        self.classifier_padding = classifier_padding
        self.imagenet_norm = imagenet_norm
        self.torchvision_names = dict(torchvision_names)
        self.torchvision_dropped = tuple(torchvision_dropped)
        # Weight names (suffixes) where torchvision has a smaller kernel than ours, centred on load.
        self.torchvision_smaller_kernels = tuple(torchvision_smaller_kernels)
        # Layers the ImageNet classifier had after the score source that the FCN drops
        # (kept as plain data, not submodules: they only enter Table 1's receptive field).
        self.classifier_tail = tuple(classifier_tail)

    def layers_until(self, name: str) -> list[nn.Module]:
        """The layers from the input up to and including `name`."""
        out = []
        for layer_name, layer in self.named_children():
            out.append(layer)
            if layer_name == name:
                return out
        raise KeyError(f"{self.name} trunk has no layer {name!r}; layers: {', '.join(self._modules)}")

    def forward(self, x, keep=()):
        keep = set(keep)
        missing = keep - set(self._modules)
        if missing:
            raise KeyError(f"{self.name} trunk has no layer(s) {sorted(missing)}; layers: {', '.join(self._modules)}")
        kept = {}
        layers = list(self._modules.items())
        for i, (name, layer) in enumerate(layers):
            x = layer(x)
            if name in keep:
                following = layers[i + 1][1] if i + 1 < len(layers) else None
                # An in-place activation next would overwrite what we keep.
                kept[name] = x.clone() if getattr(following, "inplace", False) else x
                if len(kept) == len(keep):
                    break
        return kept

    @property
    def score_source(self) -> str:
        return self.taps[32]


def _vgg16(width: float) -> Trunk:
    blocks = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    names: dict[str, str] = {}
    index, in_ch = 0, 3  # index walks torchvision's vgg16.features
    for b, (ch, n) in enumerate(blocks, start=1):
        out = scaled(ch, width)
        for i in range(1, n + 1):
            pad = FIRST_CONV_PADDING if (b, i) == (1, 1) else 1
            layers[f"conv{b}_{i}"] = nn.Conv2d(in_ch, out, 3, padding=pad)
            layers[f"relu{b}_{i}"] = nn.ReLU(inplace=True)
            names[f"conv{b}_{i}"] = f"features.{index}"
            index += 2
            in_ch = out
        layers[f"pool{b}"] = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        index += 1
    fc = scaled(4096, width)
    layers.update(_fc_head(in_ch, fc, 7))
    names.update(fc6="classifier.0", fc7="classifier.3")
    init_from_scratch(layers.values())
    return Trunk(
        layers, name="vgg16", taps={8: "pool3", 16: "pool4", 32: "drop7"},
        tap_channels={8: scaled(256, width), 16: scaled(512, width), 32: fc},
        first_conv="conv1_1", classifier_padding=1,
        imagenet_norm=BACKBONE_NORMS["vgg16"], torchvision_names=names, torchvision_dropped=("classifier.6",),
    )


def _fc_head(in_channels: int, fc: int, kernel: int) -> list:
    """fc6 as a kernel x kernel convolution without padding, fc7 as 1 x 1, each with ReLU and dropout."""
    return [("fc6", nn.Conv2d(in_channels, fc, kernel)), ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout(0.5)),
            ("fc7", nn.Conv2d(fc, fc, 1)), ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout(0.5))]


def _alexnet_layers(channels: tuple[int, ...], fc: int, groups: int, lrn: bool) -> "OrderedDict[str, nn.Module]":
    """AlexNet's geometry: conv1 11x11 stride 4, 3x3 stride-2 pools, conv2 5x5, conv3-5 3x3, fc6 6x6;
    conv2, conv4 and conv5 in `groups` groups; with lrn, a local response normalisation after
    pool1 and pool2 (pool, then norm)."""
    c1, c2, c3, c4, c5 = channels

    def norm(name):
        return [(name, nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0))] if lrn else []

    return OrderedDict([
        ("conv1", nn.Conv2d(3, c1, 11, stride=4, padding=FIRST_CONV_PADDING)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
        *norm("norm1"),
        ("conv2", nn.Conv2d(c1, c2, 5, padding=2, groups=groups)),
        ("relu2", nn.ReLU(inplace=True)),
        ("pool2", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
        *norm("norm2"),
        ("conv3", nn.Conv2d(c2, c3, 3, padding=1)),
        ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(c3, c4, 3, padding=1, groups=groups)),
        ("relu4", nn.ReLU(inplace=True)),
        ("conv5", nn.Conv2d(c4, c5, 3, padding=1, groups=groups)),
        ("relu5", nn.ReLU(inplace=True)),
        ("pool5", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
        *_fc_head(c5, fc, 6),
    ])


def _alexnet(width: float) -> Trunk:
    """torchvision's AlexNet (the single-tower 64-192-384-256-256 variant, no LRN).

    Its geometry is Caffe AlexNet's: conv1 11x11 stride 4, 3x3 stride-2 pools,
    conv2 5x5 pad 2, conv3-5 3x3 pad 1, fc6 6x6. Strides present: 8 after pool1,
    16 after pool2, 32 after pool5, so all three FCN variants have their taps.
    """
    channels = tuple(scaled(c, width) for c in (64, 192, 384, 256, 256))
    fc = scaled(4096, width)
    layers = _alexnet_layers(channels, fc, groups=1, lrn=False)
    names = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
             "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4"}
    init_from_scratch(layers.values())
    return Trunk(
        layers, name="alexnet", taps={8: "pool1", 16: "pool2", 32: "drop7"},
        tap_channels={8: channels[0], 16: channels[1], 32: fc},
        first_conv="conv1", classifier_padding=2,
        imagenet_norm=BACKBONE_NORMS["alexnet"], torchvision_names=names, torchvision_dropped=("classifier.6",),
    )


def _caffe_alexnet(width: float) -> Trunk:
    """Caffe's AlexNet as FCN-AlexNet uses it (the reference's voc-fcn-alexnet/net.py).

    96-256-384-384-256 channels, conv2, conv4 and conv5 in two groups, and local
    response normalisation (local_size 5, alpha 1e-4, beta 0.75) after pool1 and
    pool2: pool then norm, in that order, as in the reference's net. Geometry is
    torchvision AlexNet's, so crops and upsampling kernels come out the same
    (x32 kernel 63, final crop 18). Its weights exist only as Caffe models
    (BGR, 0-255, mean subtracted), so its own normalisation is caffe-bgr.
    Grouped layers need even channel counts: every count is rounded to one.
    """
    channels = tuple(2 * scaled(c // 2, width) for c in (96, 256, 384, 384, 256))
    fc = scaled(4096, width)
    layers = _alexnet_layers(channels, fc, groups=2, lrn=True)
    init_from_scratch(layers.values())
    # No torchvision classifier has this trunk: torchvision_names is empty, and
    # surgery.load_imagenet_weights says so. Caffe's classifier has no input padding.
    return Trunk(
        layers, name="caffe-alexnet", taps={8: "pool1", 16: "pool2", 32: "drop7"},
        tap_channels={8: channels[0], 16: channels[1], 32: fc},
        first_conv="conv1", classifier_padding=0,
        imagenet_norm=BACKBONE_NORMS["caffe-alexnet"], torchvision_names={}, torchvision_dropped=(),
    )


# torchvision / Caffe GoogLeNet inception configurations:
# in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection.
INCEPTIONS = OrderedDict([
    ("inception3a", (192, 64, 96, 128, 16, 32, 32)),
    ("inception3b", (256, 128, 128, 192, 32, 96, 64)),
    ("inception4a", (480, 192, 96, 208, 16, 48, 64)),
    ("inception4b", (512, 160, 112, 224, 24, 64, 64)),
    ("inception4c", (512, 128, 128, 256, 24, 64, 64)),
    ("inception4d", (512, 112, 144, 288, 32, 64, 64)),
    ("inception4e", (528, 256, 160, 320, 32, 128, 128)),
    ("inception5a", (832, 256, 160, 320, 32, 128, 128)),
    ("inception5b", (832, 384, 192, 384, 48, 128, 128)),
])


def _googlenet(width: float) -> Trunk:
    """torchvision's GoogLeNet modules (BasicConv2d = conv + batch norm, Inception) in Caffe's geometry.

    torchvision's GoogLeNet departs from the Caffe net the paper used in two
    places that change the geometry: the "5x5" inception branch is a 3x3
    convolution (a known torchvision quirk, pytorch/vision#906) and pool4 is
    2x2 instead of 3x3. With those the trunk's receptive field, counted like the
    paper's Table 1, is 571; with Caffe's 5x5 branches and 3x3 pool4 it is the
    paper's 907. We build Caffe's geometry: it is the network the paper measured,
    and torchvision's ImageNet weights still load exactly into the 5x5 branches
    (surgery centres each 3x3 kernel in a zero 5x5 one, the same function); only
    pool4's window differs from what those weights were trained with.

    The FCN scores the last inception output (the paper discards the average
    pool for accuracy); Table 1's 907 counts the classifier's 7x7 average pool,
    kept here as `classifier_tail`. Taps: stride 8 after inception3b, 16 after
    inception4e, 32 after inception5b.
    """
    from torchvision.models.googlenet import BasicConv2d, Inception

    def inception(cin, cfg):
        # cfg[0], the unscaled input width, is implied by the previous block's scaled branches
        c1, c3r, c3, c5r, c5, cp = (scaled(c, width) for c in cfg[1:])
        block = Inception(cin, c1, c3r, c3, c5r, c5, cp)
        block.branch3[1] = BasicConv2d(c5r, c5, kernel_size=5, padding=2)
        return block, c1 + c3 + c5 + cp

    layers: OrderedDict[str, nn.Module] = OrderedDict([
        ("conv1", BasicConv2d(3, scaled(64, width), kernel_size=7, stride=2, padding=FIRST_CONV_PADDING)),
        ("maxpool1", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
        ("conv2", BasicConv2d(scaled(64, width), scaled(64, width), kernel_size=1)),
        ("conv3", BasicConv2d(scaled(64, width), scaled(192, width), kernel_size=3, padding=1)),
        ("maxpool2", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
    ])
    channels, cin = {}, scaled(192, width)
    for name, cfg in INCEPTIONS.items():
        layers[name], channels[name] = inception(cin, cfg)
        cin = channels[name]
        if name == "inception3b":
            layers["maxpool3"] = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        if name == "inception4e":
            layers["maxpool4"] = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # Caffe's pool4/3x3_s2
    layers["dropout"] = nn.Dropout(0.4)  # Caffe GoogLeNet's pool5/drop_7x7_s1 rate
    names = {n: n for n in ("conv1", "conv2", "conv3", *INCEPTIONS)}
    return Trunk(
        layers, name="googlenet", taps={8: "inception3b", 16: "inception4e", 32: "dropout"},
        tap_channels={8: channels["inception3b"], 16: channels["inception4e"], 32: channels["inception5b"]},
        first_conv="conv1.conv", classifier_padding=3,
        imagenet_norm=BACKBONE_NORMS["googlenet"], torchvision_names=names,
        torchvision_dropped=("fc", "aux1", "aux2"), torchvision_smaller_kernels=("branch3.1.conv.weight",),
        classifier_tail=(nn.AvgPool2d(7, stride=1),),
    )


BUILDERS = {"vgg16": _vgg16, "alexnet": _alexnet, "googlenet": _googlenet, "caffe-alexnet": _caffe_alexnet}
BACKBONES = tuple(BUILDERS)
if set(BUILDERS) != set(BACKBONE_NORMS):
    raise ImportError(f"fcn_models.norms.BACKBONE_NORMS names {sorted(BACKBONE_NORMS)}, "
                      f"but fcn_models.backbones builds {sorted(BUILDERS)}")


def build_trunk(backbone: str = "vgg16", width: float = 1.0) -> Trunk:
    if backbone not in BUILDERS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if not 0 < width <= MAX_WIDTH:
        raise ValueError(f"width {width!r} is outside (0, {MAX_WIDTH:g}], the widths a trunk is built at "
                         "(MAX_WIDTH in fcn_models/limits.py)")
    return BUILDERS[backbone](float(width))
