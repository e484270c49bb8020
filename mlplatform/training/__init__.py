"""Training: the flight-delay model, tracked and registered in MLflow, promoted through a gate."""
