"""Tracking: the MLflow store and a stage's run, provenance, figures, val scoring and the paper's table."""
