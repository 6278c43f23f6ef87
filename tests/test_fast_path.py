"""The resident loader computes what the tutorial path computes (CUDA: test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from fashion_sweep.config import ConfigError
from fashion_sweep.core.data import load_splits, make_loaders
from fashion_sweep.run import train
from tests.conftest import SMALL

CPU = torch.device("cpu")
PERF = ("perf/epoch_seconds", "perf/eval_seconds", "perf/samples_per_second")


def cut(data_root, reader):
    # 1,000 is not a multiple of 64: the ragged last batch is in every epoch
    return load_splits(data_root, train_size=1000, val_size=300, test_size=500, reader=reader)


@pytest.fixture(scope="module")
def splits(data_root):
    return cut(data_root, "idx")


@pytest.mark.equivalence
def test_the_idx_reader_reads_what_torchvision_reads(data_root):
    ours, theirs = load_splits(data_root), load_splits(data_root, reader="torchvision")
    for split in ("train", "test"):
        a, b = ours[split].dataset, theirs[split].dataset
        assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
        for index in (0, 1, len(a) - 1):
            (Xa, ya), (Xb, yb) = a[index], b[index]
            assert torch.equal(Xa, Xb) and ya == yb and type(ya) is type(yb)


@pytest.mark.equivalence
@pytest.mark.parametrize("shuffle", [False, True])
def test_loaders_feed_the_same_batches_in_the_same_order(data_root, splits, shuffle):
    # the tutorial's path as train.py builds it: torchvision's dataset and DataLoader
    torch_path = make_loaders(cut(data_root, "torchvision"), "torch", 64, CPU, shuffle, seed=3)
    resident = make_loaders(splits, "resident", 64, CPU, shuffle=shuffle, seed=3)
    for name in ("train", "val", "test"):
        for epoch in range(2):  # a shuffled loader draws a new order each epoch
            a, b = list(torch_path[name]), list(resident[name])
            assert len(a) == len(b) == len(torch_path[name]) == len(resident[name])
            for (Xa, ya), (Xb, yb) in zip(a, b, strict=True):
                assert torch.equal(Xa, Xb) and torch.equal(ya, yb), (name, epoch)
            assert Xb.dtype == torch.float32 and Xb.shape[1:] == (1, 28, 28)
    first = [y for _, y in make_loaders(splits, "resident", 64, CPU, True, seed=3)["train"]]
    other = [y for _, y in make_loaders(splits, "resident", 64, CPU, True, seed=4)["train"]]
    assert shuffle is False or not torch.equal(first[0], other[0])


@pytest.mark.equivalence
@pytest.mark.parametrize("shuffle", ["false", "true"])
def test_runs_on_either_loader_log_the_same_metrics(compose, store, shuffle):
    def metrics(loader):
        cfg = compose(*SMALL, f"tracking.uri={store}", f"data.loader={loader}")
        cfg.data.shuffle = shuffle == "true"
        return {k: v for k, v in train(cfg).metrics.items() if k not in PERF}

    torch_path, resident = metrics("torch"), metrics("resident")
    assert resident == pytest.approx(torch_path, rel=1e-6, abs=1e-9)


def test_cuda_graph_is_refused_on_cpu(compose, store):
    cfg = compose(*SMALL, f"tracking.uri={store}", "trainer.cuda_graph=true", "trainer.device=cpu")
    with pytest.raises(ConfigError, match=r"trainer\.cuda_graph=true needs CUDA"):
        train(cfg)
