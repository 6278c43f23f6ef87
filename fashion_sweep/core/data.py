"""FashionMNIST: finding the files offline, the train/val/test splits, and the loaders.

Two loaders feed the same images in the same order with the same scaling:
`torch` is the tutorial's torchvision dataset + ToTensor + DataLoader; `resident`
decodes a split once into one tensor on the training device and slices batches
from it, which removes the per-image PIL work and the host-to-device copies.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

log = logging.getLogger(__name__)
# The uncompressed idx files torchvision reads from <root>/FashionMNIST/raw/, by size.
RAW_FILES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
# Debian's package dataset-fashion-mnist: the same contents, gzipped differently from
# the files torchvision checksums, so they are unpacked rather than handed to download.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "install Debian's copy with `apt-get install dataset-fashion-mnist` (make data), "
    "or pass data.download=true where there is internet"
)


class DataError(RuntimeError):
    """The dataset is missing or damaged; the message says how to get it."""


def prepare_raw(root: str | Path, download: bool = False) -> Path:
    """Makes sure <root>/FashionMNIST/raw/ holds the four idx files, whole. Any number
    of processes may do this at once on a fresh root."""
    raw = Path(root) / "FashionMNIST" / "raw"
    if download:
        _download(root)
    missing = [name for name in RAW_FILES if not (raw / name).exists()]
    if missing and not download and all((DEBIAN_DIR / f"{n}.gz").exists() for n in missing):
        log.info(f"data.root={root}: unpacking Debian's FashionMNIST into {raw} (55 MB, once)")
    for name, size in RAW_FILES.items():
        path = raw / name
        try:
            if not path.exists():
                _unpack_debian_copy(name, path)
            found = path.stat().st_size
        except OSError as error:  # not a folder, not writable, a full disk
            raise DataError(
                f"data.root={root}: cannot write {path} ({error.strerror or error}): "
                f"point data.root at a writable folder, or unpack the four files there "
                f"yourself; to get them, {HOW_TO_GET}"
            ) from None
        if found != size:
            raise DataError(
                f"{path} is truncated or damaged ({found} bytes, expected "
                f"{size}): delete it and run again to unpack it afresh, or {HOW_TO_GET}"
            )
    return raw


def _download(root: str | Path) -> None:
    from torchvision import datasets

    try:
        datasets.FashionMNIST(str(root), train=True, download=True)
        datasets.FashionMNIST(str(root), train=False, download=True)
    except Exception as error:  # offline, a proxy, a server that is down
        reason = " ".join(str(error).split())[:300]
        raise DataError(
            f"data.download=true: the download failed ({type(error).__name__}: {reason}); "
            f"offline, set data.download=false and {HOW_TO_GET.split(', or ')[0]}"
        ) from None


def _unpack_debian_copy(name: str, path: Path) -> None:
    source = DEBIAN_DIR / f"{name}.gz"
    if not source.exists():
        raise DataError(f"FashionMNIST not found: no {path} and no {source}; {HOW_TO_GET}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # note: each process unpacks into a file of its own beside the target, then renames
    # it into place: an interrupted run leaves no half file, and processes unpacking at
    # once on a fresh root each rename a whole copy (the last one stays)
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
        with gzip.open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else set and set back."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_splits(
    root: str | Path,
    train_size: int | None = None,
    val_size: int = 0,
    test_size: int | None = None,
    split_seed: int = 0,
    reader: str = "idx",
) -> dict[str, Subset]:
    """The tutorial's datasets, cut to size.

    val_size images are drawn from the training set with split_seed; train_size and
    test_size then take the first N images of what is left of each split, in order.
    The same arguments give the same Subset objects within a process, so the trials of
    a sweep share them, and the tensors the resident loader decodes from them.
    reader="torchvision" reads them with torchvision's FashionMNIST + ToTensor (the
    tutorial's own path, for the `torch` loader); "idx" reads the same files into the
    same tensors without importing torchvision (seconds of start-up).
    """
    return _splits(str(Path(root).resolve()), train_size, val_size, test_size, split_seed, reader)


@functools.lru_cache(maxsize=4)
def _splits(
    root: str,
    train_size: int | None,
    val_size: int,
    test_size: int | None,
    split_seed: int,
    reader: str,
) -> dict[str, Subset]:
    train_full, test_full = _fashion_mnist(root) if reader == "torchvision" else _idx(root)
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(len(train_full), generator=generator)
    val_idx = order[:val_size].sort().values
    train_idx = order[val_size:].sort().values[:train_size]
    splits = {"train": Subset(train_full, train_idx.tolist())}
    if val_size:
        splits["val"] = Subset(train_full, val_idx.tolist())
    splits["test"] = Subset(test_full, list(range(test_size or len(test_full))))
    return splits


@functools.lru_cache(maxsize=2)
def _fashion_mnist(root: str) -> tuple[Dataset, Dataset]:
    """Both splits, decoded once per process: a sweep's trials share them."""
    # note: torchvision is imported where it is used; it takes seconds to import
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    return (
        datasets.FashionMNIST(root, train=True, transform=ToTensor()),
        datasets.FashionMNIST(root, train=False, transform=ToTensor()),
    )


class IdxImages(Dataset):
    """One split read straight from its idx files: `data` (uint8, N x 28 x 28) and
    `targets` (int64) as torchvision's FashionMNIST holds them, and items as its
    ToTensor transform gives them (float32 1 x 28 x 28 in [0, 1], an int label)."""

    def __init__(self, raw: Path, prefix: str) -> None:
        self.data = _read_idx(raw / f"{prefix}-images-idx3-ubyte")
        self.targets = _read_idx(raw / f"{prefix}-labels-idx1-ubyte").long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index].unsqueeze(0).float().div(255), int(self.targets[index])


def _read_idx(path: Path) -> torch.Tensor:
    """An uncompressed idx file of unsigned bytes: a big-endian header (magic number
    0x0000080N, then N sizes), then the values."""
    data = bytearray(path.read_bytes())
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08 or not 1 <= magic & 0xFF <= 3:
        raise DataError(f"{path} is not an idx file of unsigned bytes: delete it and run again")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * ndim).view(shape)


@functools.lru_cache(maxsize=2)
def _idx(root: str) -> tuple[IdxImages, IdxImages]:
    """Both splits, read once per process: a sweep's trials share them."""
    raw = Path(root) / "FashionMNIST" / "raw"
    return IdxImages(raw, "train"), IdxImages(raw, "t10k")


class ResidentLoader:
    """Batches sliced from one tensor that already lives on the device.

    With shuffle it makes the same draws from its generator as
    DataLoader(shuffle=True, generator=...): one for the iterator's base seed, then
    RandomSampler's randperm and its trailing one, so both loaders yield one order for
    one seed, epoch after epoch (tests/test_fast_path.py holds torch to that).
    """

    def __init__(
        self,
        split: Subset,
        batch_size: int,
        device: torch.device,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.dataset = TensorDataset(*_resident(split, device))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator if generator is not None else torch.Generator()

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def slices(self, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order (never shuffled), in slices of at most `limit` images
        that end on batch boundaries: fewer, larger forward passes for evaluation."""
        images, labels = self.dataset.tensors
        step = max(1, limit // self.batch_size) * self.batch_size
        for start in range(0, len(images), step):
            yield images[start : start + step], labels[start : start + step]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.dataset.tensors
        n, size = len(self.dataset), self.batch_size
        if not self.shuffle:
            for start in range(0, n, size):
                yield images[start : start + size], labels[start : start + size]
            return
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator).to(images.device)
        for start in range(0, n, size):
            batch = order[start : start + size]
            yield images[batch], labels[batch]
        # RandomSampler draws one more (empty) permutation when it runs out
        torch.randperm(n, generator=self.generator)


# A split's tensors on each device, decoded once: trials of a sweep in one process
# share them (nothing writes to them: batches are slices and index copies).
_RESIDENT: weakref.WeakKeyDictionary[Subset, dict[str, tuple[torch.Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _resident(split: Subset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    per_device = _RESIDENT.setdefault(split, {})
    if str(device) not in per_device:
        source = split.dataset
        idx = torch.as_tensor(split.indices, dtype=torch.long)
        # note: exactly ToTensor's scaling of a uint8 'L' image: float32, divided by 255
        images = source.data[idx].to(device).unsqueeze(1).float().div(255)
        per_device[str(device)] = (images, source.targets[idx].to(device))
    return per_device[str(device)]


def make_loaders(
    splits: dict[str, Subset],
    loader: str,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
) -> dict[str, DataLoader | ResidentLoader]:
    """One loader per split; only the training loader shuffles, seeded by `seed`."""
    loaders: dict[str, DataLoader | ResidentLoader] = {}
    for name, split in splits.items():
        train = name == "train"
        generator = torch.Generator().manual_seed(seed) if train else None
        if loader == "resident":
            loaders[name] = ResidentLoader(split, batch_size, device, shuffle and train, generator)
        else:
            loaders[name] = DataLoader(
                split,
                batch_size=batch_size,
                shuffle=shuffle and train,
                num_workers=num_workers,
                generator=generator,
                pin_memory=device.type == "cuda",
            )
    return loaders
