"""The workflow around fcn_models: DVC stages, Ray training, MLflow tracking."""
