"""The engine computes exactly what the tutorial's train() and test() compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fashion_sweep.core.data import load_splits
from fashion_sweep.core.engine import DivergedError, TrainStep, evaluate, train_one_epoch
from fashion_sweep.core.model import NeuralNetwork

device = torch.device("cpu")


# The tutorial's loops, verbatim but for the print in test().
def tutorial_train(dataloader, model, loss_fn, optimizer):
    size = len(dataloader.dataset)
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        X, y = X.to(device), y.to(device)

        # Compute prediction error
        pred = model(X)
        loss = loss_fn(pred, y)

        # Backpropagation
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        if batch % 100 == 0:
            loss, current = loss.item(), (batch + 1) * len(X)
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")


def tutorial_test(dataloader, model, loss_fn):
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    model.eval()
    test_loss, correct = 0, 0
    with torch.no_grad():
        for X, y in dataloader:
            X, y = X.to(device), y.to(device)
            pred = model(X)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()
    test_loss /= num_batches
    correct /= size
    return test_loss, correct


def setup(seed=0, lr=1e-3):
    torch.manual_seed(seed)
    model = NeuralNetwork()
    return model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=lr)


def step_of(model, loss_fn, optimizer):
    return TrainStep(model, loss_fn, optimizer)


@pytest.fixture(scope="module")
def subset(data_root):
    splits = load_splits(data_root, train_size=3000, test_size=1000)
    return DataLoader(splits["train"], batch_size=64), DataLoader(splits["test"], batch_size=64)


@pytest.mark.equivalence
def test_engine_reproduces_the_tutorial_exactly(subset, capsys):
    train_loader, test_loader = subset
    ours, loss_fn, optimizer = setup()
    theirs, their_loss_fn, their_optimizer = setup()
    for _ in range(2):
        train_one_epoch(train_loader, step_of(ours, loss_fn, optimizer), device)
        ours_printed = capsys.readouterr().out
        ours_metrics = evaluate(test_loader, ours, loss_fn, device)
        tutorial_train(train_loader, theirs, their_loss_fn, their_optimizer)
        assert ours_printed == capsys.readouterr().out  # the same progress lines
        their_loss, their_accuracy = tutorial_test(test_loader, theirs, their_loss_fn)
        assert ours_metrics == {"loss": their_loss, "accuracy": their_accuracy}
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name
    assert ours_printed.startswith("loss: ") and "[   64/ 3000]" in ours_printed


def test_train_loss_is_the_mean_batch_loss_and_falls(subset):
    train_loader, _ = subset
    step = step_of(*setup(lr=0.1))
    first = train_one_epoch(train_loader, step, device)["loss"]
    second = train_one_epoch(train_loader, step, device)["loss"]
    assert 0 < second < first < 2.5


def test_diverging_run_stops_with_diverged_error(subset):
    train_loader, _ = subset
    step = step_of(*setup(lr=1e4))
    with pytest.raises(DivergedError, match="train/loss is (nan|inf)"):
        for _ in range(3):
            train_one_epoch(train_loader, step, device, log_interval=10)


@pytest.mark.equivalence
@pytest.mark.parametrize("slice_size", [16_384, 300])  # one pass; passes of 256 images
def test_evaluation_in_large_slices_gives_the_tutorials_numbers(
    data_root, subset, monkeypatch, slice_size
):
    from fashion_sweep.core import engine
    from fashion_sweep.core.data import make_loaders

    monkeypatch.setattr(engine, "EVAL_SLICE", slice_size)
    train_loader, test_loader = subset
    model, loss_fn, optimizer = setup(lr=0.1)
    train_one_epoch(train_loader, step_of(model, loss_fn, optimizer), device)
    # 1,000 test images: 15 batches of 64 and a ragged one of 40
    splits = load_splits(data_root, train_size=3000, test_size=1000)
    resident = make_loaders(splits, "resident", 64, device)["test"]
    ours = evaluate(resident, model, loss_fn, device)
    their_loss, their_accuracy = tutorial_test(test_loader, model, loss_fn)
    assert ours["loss"] == pytest.approx(their_loss, rel=1e-6)
    assert abs(ours["accuracy"] - their_accuracy) * 1000 <= 2  # at most 2 images
    assert 0.5 < ours["accuracy"] < 0.9  # a model that learned something, not a tie
