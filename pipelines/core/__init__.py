"""The ground floor: params, atomic files, errors, how a command ends, the driver process. No Ray, MLflow or torch."""
