"""Test helpers shared across parts: caffe_files."""
import numpy as np

from fcn_models.surgery import bilinear_weight

# At-once scales pool4 by 0.01 and pool3 by 0.0001: their score layers get the inverse
# gain so that the skips weigh as much as in the staged net.
ATONCE_GAIN = {"score_pool4": 100.0, "score_pool3": 1e4}


def reference_weights(net, seed: int, perturb_upsampling: bool = False) -> dict:
    """Seeded weights for a cw net: He-scaled convolutions (activations stay on the input's
    scale through the trunk), bilinear upsampling as the reference's surgery sets it
    (optionally perturbed, to see that the layout is kept), at-once's constant scales."""
    rng = np.random.default_rng(seed)
    atonce = any(layer.type == "Scale" for layer in net)
    weights = {}
    for layer in net:
        if not layer.blob_shapes:
            continue
        if layer.type == "Deconvolution":
            shape = layer.blob_shapes[0]
            w = bilinear_weight(shape[0], shape[-1]).numpy()
            if perturb_upsampling:
                w = w + 0.05 * rng.standard_normal(shape).astype(np.float32)
            weights[layer.name] = [w]
        elif layer.type == "Scale":
            weights[layer.name] = [np.full(layer.blob_shapes[0], 0.01 if "pool4" in layer.name else 0.0001, np.float32)]
        else:
            w_shape, b_shape = layer.blob_shapes
            gain = ATONCE_GAIN.get(layer.name, 1.0) if atonce else 1.0
            std = np.sqrt(2.0 / np.prod(w_shape[1:])) * gain
            weights[layer.name] = [(rng.standard_normal(w_shape) * std).astype(np.float32),
                                   (rng.standard_normal(b_shape) * 0.1 * gain).astype(np.float32)]
    return weights
