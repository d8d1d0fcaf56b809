"""Fully Convolutional Networks for semantic segmentation, in plain PyTorch.

    model = fcn_models.build_fcn("fcn8s", "vgg16", num_classes=21)
    fcn_models.surgery.load_imagenet_weights(model, "vgg16.pth")   # torchvision-format ImageNet weights
    scores = model(fcn_models.normalize(image, model.input_norm)[None])

Only torch, torchvision, numpy and the standard library are used; torchvision is
imported when a GoogLeNet trunk is built or its weights are fetched, not here.
"""
from . import checkpoint, geometry, preprocess, surgery
from .backbones import BACKBONES, Trunk, build_trunk
from .checkpoint import load_checkpoint, save_checkpoint
from .fcn import FCN, VARIANTS, build_fcn, optimize_for_inference, reference_param_groups
from .preprocess import CAFFE_BGR, TORCHVISION_RGB, InputNorm, normalize
from .surgery import load_imagenet_weights, transfer_weights

__all__ = [
    "BACKBONES", "VARIANTS", "FCN", "Trunk", "build_fcn", "build_trunk", "optimize_for_inference",
    "reference_param_groups", "InputNorm", "CAFFE_BGR", "TORCHVISION_RGB", "normalize",
    "load_imagenet_weights", "transfer_weights", "save_checkpoint", "load_checkpoint",
    "checkpoint", "geometry", "preprocess", "surgery",
]
