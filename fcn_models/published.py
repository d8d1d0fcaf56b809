"""The numbers the paper and the reference implementation published, to compare ours with.

All on PASCAL VOC 2011 seg11valid (736 images), in percent: pixel accuracy, mean
accuracy, mean IU, frequency-weighted IU (fcn_models.metrics.SCORE_KEYS, that order).

    PAPER        Table 3 of the paper (the CVPR version's FCN-32s-fixed, -32s, -16s, -8s)
    REFERENCE    the mean IU the reference's README gives for its released models
    CONVERTED    the four scores of the released models' weights, converted from Caffe, as
                 the Chainer port of the reference (wkentaro/fcn) reports them
    NAMES        how the paper names each network (a training stage's row keeps its name)
"""
from __future__ import annotations

NAMES = {"fcn32s-fixed": "FCN-32s-fixed", "fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s",
         "fcn8s-atonce": "FCN-8s at-once", "fcn-alexnet": "FCN-AlexNet"}
PAPER = {
    "fcn32s-fixed": (83.0, 59.7, 45.4, 72.0),
    "fcn32s": (89.1, 73.3, 59.4, 81.4),
    "fcn16s": (90.0, 75.7, 62.4, 83.0),
    "fcn8s": (90.3, 75.9, 62.7, 83.2),
}
REFERENCE = {"fcn32s": 63.6, "fcn16s": 65.0, "fcn8s": 65.5, "fcn8s-atonce": 65.4, "fcn-alexnet": 48.0}
CONVERTED = {
    "fcn32s": (90.48, 76.48, 63.63, 83.46),
    "fcn16s": (91.00, 78.07, 65.01, 84.26),
    "fcn8s": (91.22, 77.61, 65.51, 84.54),
    "fcn8s-atonce": (91.13, 78.50, 65.40, 84.43),
}
# Where the reference publishes each model (its voc-*/caffemodel-url files).
REFERENCE_URLS = {
    "fcn32s": "http://dl.caffe.berkeleyvision.org/fcn32s-heavy-pascal.caffemodel",
    "fcn16s": "http://dl.caffe.berkeleyvision.org/fcn16s-heavy-pascal.caffemodel",
    "fcn8s": "http://dl.caffe.berkeleyvision.org/fcn8s-heavy-pascal.caffemodel",
    "fcn8s-atonce": "http://dl.caffe.berkeleyvision.org/fcn8s-atonce-pascal.caffemodel",
    "fcn-alexnet": "http://dl.caffe.berkeleyvision.org/fcn-alexnet-pascal.caffemodel",
}
