"""Serving: the registered model, where a model comes from, predicting files and batches, ONNX export, images."""
