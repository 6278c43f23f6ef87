"""fashion_sweep: the PyTorch Quickstart as a Hydra + Optuna + MLflow sweep harness."""
