"""Fully Convolutional Networks for semantic segmentation, in plain PyTorch.

    model = fcn_models.build_fcn("fcn8s", "vgg16", num_classes=21)
    fcn_models.surgery.load_imagenet_weights(model, "vgg16.pth")   # torchvision-format ImageNet weights
    scores = model(fcn_models.normalize(image, model.input_norm)[None])

Only torch, torchvision, numpy and the standard library are used. Names are loaded
on first use, so `import fcn_models.voc` (the class names) or `fcn_models.norms`
costs no torch import; torchvision is imported when a GoogLeNet trunk is built or
its weights are fetched.
"""
import importlib

# name -> the submodule that defines it
_EXPORTS = {
    "BACKBONES": "backbones", "Trunk": "backbones", "build_trunk": "backbones",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "FCN": "fcn", "VARIANTS": "fcn", "build_fcn": "fcn", "optimize_for_inference": "fcn",
    "reference_param_groups": "fcn",
    "CAFFE_BGR": "norms", "TORCHVISION_RGB": "norms", "InputNorm": "norms",
    "normalize": "preprocess",
    "load_imagenet_weights": "surgery", "transfer_weights": "surgery",
}
_SUBMODULES = ("backbones", "checkpoint", "fcn", "geometry", "metrics", "norms", "palette", "preprocess",
               "subnormals", "summary", "surgery", "voc")

__all__ = [*_EXPORTS, *_SUBMODULES]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
