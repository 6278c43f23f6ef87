"""On CUDA: the graph-captured train step computes what the eager one computes.

Imports torch and the engine only, so `.ci/gpu-check` runs it on a GPU machine that has
no Hydra or MLflow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fashion_sweep.core.data import load_splits, make_loaders
from fashion_sweep.core.engine import TrainStep, evaluate, train_one_epoch
from fashion_sweep.core.model import NeuralNetwork
from tests.conftest import ADAM_ACCURACY, ADAM_LOSS_REL

pytestmark = [
    pytest.mark.equivalence,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def splits(data_root):
    # 1,000 is not a multiple of 64: the ragged last batch is in every epoch
    return load_splits(data_root, train_size=1000, test_size=500)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cuda_graph_step_matches_eager(splits, optimizer):
    device = torch.device("cuda")
    results = []
    for graph in (False, True):
        loaders = make_loaders(splits, "resident", 64, device, shuffle=True, seed=0)
        torch.manual_seed(0)
        model = NeuralNetwork().to(device)
        opt = (
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if optimizer == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-3, capturable=graph)
        )
        step = TrainStep(model, nn.CrossEntropyLoss(), opt, cuda_graph=graph)
        losses = [train_one_epoch(loaders["train"], step, device)["loss"] for _ in range(3)]
        results.append((losses, evaluate(loaders["test"], model, nn.CrossEntropyLoss(), device)))
        assert (step.graph is not None) == graph
    (eager_losses, eager), (graph_losses, graphed) = results
    # capturable Adam keeps its step count on the device and computes its bias
    # corrections there: another rounding, which Adam amplifies (tests/conftest.py)
    rel, accuracy = (1e-4, 0.004) if optimizer == "sgd" else (ADAM_LOSS_REL, ADAM_ACCURACY)
    assert graph_losses == pytest.approx(eager_losses, rel=rel)
    assert graphed["loss"] == pytest.approx(eager["loss"], rel=rel)
    assert abs(graphed["accuracy"] - eager["accuracy"]) <= accuracy  # SGD: 2 of 500 flip


def test_cuda_graph_on_the_full_tutorial_run_matches_eager(data_root):
    """The default run, 5 epochs on all 60,000 images, eager and graph-captured."""
    device = torch.device("cuda")
    splits = load_splits(data_root)
    results = []
    for graph in (False, True):
        loaders = make_loaders(splits, "resident", 64, device)
        torch.manual_seed(0)
        model = NeuralNetwork().to(device)
        step = TrainStep(
            model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=1e-3), graph
        )
        for _ in range(5):
            train_one_epoch(loaders["train"], step, device)
        results.append(evaluate(loaders["test"], model, nn.CrossEntropyLoss(), device))
    eager, graphed = results
    assert 0.60 <= eager["accuracy"] <= 0.70
    assert graphed["accuracy"] == pytest.approx(eager["accuracy"], abs=0.002)
    assert graphed["loss"] == pytest.approx(eager["loss"], rel=1e-3)
