"""The model registry: a checkpoint published as a registered model, its card, the champion gate."""
