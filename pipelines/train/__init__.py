"""Training: the recipe (what decides a result), the worker loop, the Ray Train driver, the cluster."""
