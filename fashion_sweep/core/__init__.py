"""The core layer: torch and nothing else (no Hydra, no MLflow, no Optuna).

model.py (the Quickstart MLP), data.py (FashionMNIST offline, splits, loaders),
engine.py (the tutorial's train and test loops, the CUDA-graph step), stacked.py (N
models of one shape trained as one program, for packed trials). `.ci/gpu-check` runs
this layer's tests on a GPU machine that has torch alone.
"""
