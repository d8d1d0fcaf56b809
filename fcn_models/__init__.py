"""Fully Convolutional Networks for semantic segmentation, in plain PyTorch."""
