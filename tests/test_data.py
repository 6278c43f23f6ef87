"""Finding FashionMNIST offline, refusing damaged files, and cutting the splits."""

from __future__ import annotations

import pytest
import torch

from fashion_sweep.core import data
from fashion_sweep.core.data import DataError, load_splits, prepare_raw


def test_prepare_raw_unpacks_debian_copy_into_a_fresh_root(tmp_path, caplog):
    caplog.set_level("INFO", logger="fashion_sweep.core.data")
    raw = prepare_raw(tmp_path)
    assert raw == tmp_path / "FashionMNIST" / "raw"
    said = f"data.root={tmp_path}: unpacking Debian's FashionMNIST into {raw} (55 MB, once)"
    assert [r.getMessage() for r in caplog.records] == [said]  # the user is told, once
    caplog.clear()
    prepare_raw(tmp_path)
    assert not caplog.records
    assert {p.name for p in raw.iterdir()} == set(data.RAW_FILES)
    test = load_splits(tmp_path)["test"]
    assert len(test) == 10_000 and test[0][0].shape == (1, 28, 28)


def test_truncated_file_is_refused_with_how_to_fix(tmp_path):
    raw = prepare_raw(tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated") as excinfo:
        prepare_raw(tmp_path)
    assert "t10k-images-idx3-ubyte" in str(excinfo.value)
    assert "apt-get install dataset-fashion-mnist" in str(excinfo.value)


def test_missing_data_without_debian_copy_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "not-installed")
    with pytest.raises(DataError, match="FashionMNIST not found") as excinfo:
        prepare_raw(tmp_path / "root")
    assert "apt-get install dataset-fashion-mnist" in str(excinfo.value)
    assert "data.download=true" in str(excinfo.value)


def test_subsets_take_the_first_images_in_order(data_root):
    splits = load_splits(data_root, train_size=100, test_size=50)
    full = load_splits(data_root)
    assert len(splits["train"]) == 100 and len(splits["test"]) == 50
    assert "val" not in splits
    assert torch.equal(splits["train"][99][0], full["train"][99][0])
    assert torch.equal(splits["test"][0][0], full["test"][0][0])


def test_validation_split_is_seeded_and_disjoint_from_training(data_root):
    a = load_splits(data_root, val_size=5000, split_seed=0)
    b = load_splits(data_root, val_size=5000, split_seed=0)
    c = load_splits(data_root, val_size=5000, split_seed=1)
    assert a["val"].indices == b["val"].indices != c["val"].indices
    assert len(a["val"]) == 5000 and len(a["train"]) == 55_000
    assert not set(a["val"].indices) & set(a["train"].indices)
    labels = a["val"].dataset.targets[a["val"].indices]
    assert labels.bincount().min() > 400  # a random draw covers all ten classes


def _prepare(root: str) -> int:
    prepare_raw(root)
    return 0


def test_processes_preparing_a_fresh_root_at_once_all_succeed(tmp_path):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.map(_prepare, [str(tmp_path)] * 4) == [0, 0, 0, 0]
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data.RAW_FILES)  # no leftovers
    assert {(raw / n).stat().st_size for n in data.RAW_FILES} == set(data.RAW_FILES.values())
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_mode & 0o044  # readable by others


def test_a_root_that_cannot_hold_the_files_is_refused_with_how_to_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError) as caught:
        prepare_raw(tmp_path / "file")
    message = str(caught.value)
    assert message.startswith(f"data.root={tmp_path / 'file'}: cannot write")
    assert "Not a directory" in message and "writable folder" in message


def test_a_download_that_fails_says_how_to_get_the_data(tmp_path, monkeypatch):
    from torchvision import datasets

    from tests.conftest import free_port

    # note: not a proxy in the environment: urllib keeps the first one it sees for good
    offline = [f"http://127.0.0.1:{free_port()}/"]  # refuses, as no internet does
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", offline)
    with pytest.raises(DataError) as caught:
        prepare_raw(tmp_path, download=True)
    message = str(caught.value)
    assert message.startswith("data.download=true: the download failed")
    assert "set data.download=false" in message and "\n" not in message
