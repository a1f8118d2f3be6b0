"""Datasets for the training CLI: ``digits`` (bundled), ``cifar10``, ``cifar100``, ``imagefolder``.

Each dataset yields ``(image, label, index)`` with ``image`` a ``[C, H, W]`` tensor (uint8, or
float in [0, 1] for digits); augmentation and normalisation run on whole batches on the training
device (:class:`BatchTransform`, torchvision is not used), with random numbers that depend only on
(seed, epoch, sample index), so runs are reproducible, resumable mid-epoch and independent of
the number of processes.

``digits``: scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" test set
(1,797 8x8 images, 10 classes, pixel values 0..16; E. Alpaydin, C. Kaynak, 1998; UCI, CC BY 4.0),
shipped as ``spikeops/train/data/digits.csv.gz`` -- the file ``sklearn/datasets/data/digits.csv.gz``
from the scikit-learn 1.9.1 wheel (BSD-3-Clause), 64 pixel columns then the label. It needs no
download. Split: a fixed stratified 1,437 / 360 train/test split (independent of ``--seed``).

``cifar10`` / ``cifar100``: the python versions of the archives, read from ``--data-dir``
(``cifar-10-batches-py/data_batch_1..5`` + ``test_batch``; ``cifar-100-python/train`` + ``test``),
extracted or as the original ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``. Train-time
augmentation: random crop with 4 pixels of zero padding and horizontal flip; then per-channel
normalisation.

``imagefolder``: ``--data-dir/train/<class>/*.{jpg,jpeg,png,...}`` and ``--data-dir/val/<class>/...``,
decoded with PIL and resized to ``img_size`` (bilinear). Train-time augmentation: random crop with
``img_size // 8`` padding and horizontal flip; ImageNet normalisation.
"""
from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from spikeops.train import UsageError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
DIGITS_FILE = Path(__file__).resolve().parent / "data" / "digits.csv.gz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], label_key=b"labels",
                    num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=["train"], test=["test"], label_key=b"fine_labels",
                     num_classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(FileNotFoundError):
    """A dataset's files are missing or malformed; the message names what was expected."""


class TensorImageDataset(Dataset):
    """In-memory images ``[N, C, H, W]`` and labels ``[N]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.shape[0] == labels.shape[0]
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i], i


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` decoded lazily with PIL, resized to ``size`` x ``size``, uint8 ``[C, H, W]``."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, channels: int):
        self.samples, self.size, self.mode = list(samples), size, ("RGB" if channels == 3 else "L")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
            arr = np.array(im, dtype=np.uint8)  # a writable copy
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr)), label, i


def hash_uniform(seed: int, epoch: int, ids: torch.Tensor, salt: int) -> torch.Tensor:
    """Uniform [0, 1) float64 numbers that are a pure function of (seed, epoch, sample id, salt)
    (SplitMix64 on uint64): the augmentation of sample ``i`` in epoch ``e`` is the same whatever
    the batch, process count or resume point."""
    with np.errstate(over="ignore"):
        x = ids.detach().cpu().numpy().astype(np.uint64)
        x = x + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch) * np.uint64(0xD1B54A32D192ED03)
        x = x + np.uint64(salt) * np.uint64(0x8CB92BA72F3D8DD7)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * 2.0**-53)


class BatchTransform:
    """Batch augmentation/normalisation on the training device.

    ``x`` uint8 (scaled by 1/255) or float ``[B, C, H, W]`` -> float32 ``[B, channels, size, size]``:
    when ``ids`` (the samples' dataset indices) are given and augmentation is enabled, a random
    crop with ``pad`` pixels of zero padding and a random horizontal flip, drawn by
    :func:`hash_uniform` from (seed, epoch, id); then bilinear resize to ``size``, 1 -> 3
    channel repeat and ``(x - mean) / std`` when ``mean`` is given.
    """

    def __init__(self, size: int, channels: int, pad: int = 0, flip: bool = False,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        self.size, self.channels, self.pad, self.flip = size, channels, pad, flip
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor, ids: Optional[torch.Tensor] = None, seed: int = 0, epoch: int = 0) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        b, _, h, w = x.shape
        if self.pad > 0 and ids is not None:
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            oy = (hash_uniform(seed, epoch, ids, 1) * (2 * p + 1)).long().clamp_(max=2 * p).to(x.device)
            ox = (hash_uniform(seed, epoch, ids, 2) * (2 * p + 1)).long().clamp_(max=2 * p).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
            x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
            x = x.permute(0, 3, 1, 2)
        if self.flip and ids is not None:
            flip = (hash_uniform(seed, epoch, ids, 3) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:
                raise ValueError(f"cannot turn {x.shape[1]}-channel images into {self.channels} channels")
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()


@dataclass
class DataBundle:
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    img_size: int
    train_transform: BatchTransform
    test_transform: BatchTransform
    classes: Optional[list] = None


def default_img_size(dataset: str) -> int:
    """Image size used when ``--img-size`` is not given."""
    return {"digits": 32, "cifar10": 32, "cifar100": 32, "imagefolder": 224}[dataset]


def build(dataset: str, data_dir: Optional[str], img_size: Optional[int] = None, in_channels: int = 3) -> DataBundle:
    """The train/test datasets and batch transforms for ``dataset``.

    Raises :class:`DataError` (a ``FileNotFoundError``) when files are missing, naming them.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    size = img_size or default_img_size(dataset)
    if dataset == "digits":
        return _digits(size, in_channels)
    if dataset in _CIFAR:
        return _cifar(dataset, data_dir, size, in_channels)
    return _imagefolder(data_dir, size, in_channels)


# ----------------------------------------------------------------------------------- digits
def stratified_split(labels: np.ndarray, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: (train indices, test indices), ``n_test`` test samples in total,
    allotted to classes in proportion (largest remainder), each class shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n_test / len(labels)
    alloc = np.floor(share).astype(int)
    for i in np.argsort(-(share - alloc), kind="stable")[: n_test - alloc.sum()]:
        alloc[i] += 1
    train, test = [], []
    for c, k in zip(classes, alloc):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797, 8, 8] in 0..16, labels int64 [1797]) from the bundled file."""
    if not DIGITS_FILE.is_file():
        raise DataError(f"the bundled digits file {DIGITS_FILE} is missing (reinstall spikeops)")
    arr = np.loadtxt(DIGITS_FILE, delimiter=",", dtype=np.float32)
    return arr[:, :64].reshape(-1, 8, 8), arr[:, 64].astype(np.int64)


def _digits(size: int, channels: int) -> DataBundle:
    images, labels = load_digits_arrays()
    train_idx, test_idx = stratified_split(labels, n_test=360, seed=0)
    x = torch.from_numpy(images / 16.0).float()[:, None]  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.from_numpy(labels)
    tf = BatchTransform(size, channels)  # no augmentation, no normalisation: values in [0, 1]
    return DataBundle("digits", TensorImageDataset(x[train_idx], y[train_idx]), TensorImageDataset(x[test_idx], y[test_idx]),
                      10, channels, size, tf, tf)


# ------------------------------------------------------------------------------------ CIFAR
def _cifar_source(spec: dict, data_dir: Optional[str], label: str):
    """('dir', path) or ('tar', path) for the CIFAR files, or a DataError naming what was expected."""
    names = spec["train"] + spec["test"]
    where = f"--data-dir {data_dir}" if data_dir else "--data-dir"
    expected = (f"{label} not found. Expected the python version of the dataset in {where}: "
                f"{spec['folder']}/{{{', '.join(names)}}}, or the archive {spec['archive']} "
                f"({spec['url']}); this CLI does not download.")
    if not data_dir:
        raise DataError(f"--data-dir is required for {label}. " + expected)
    root = Path(data_dir)
    missing = None
    for d in (root / spec["folder"], root):
        have = [n for n in names if (d / n).is_file()]
        if len(have) == len(names):
            return "dir", d
        if have and missing is None:
            missing = [str(d / n) for n in names if n not in have]
    if (root / spec["archive"]).is_file():
        return "tar", root / spec["archive"]
    if missing:
        raise DataError(f"{label}: missing files {', '.join(missing)}. " + expected)
    raise DataError(expected)


def _read_cifar_pickles(kind: str, src: Path, folder: str, files: list[str], label_key: bytes):
    xs, ys = [], []
    tar = tarfile.open(src, "r:gz") if kind == "tar" else None
    try:
        for name in files:
            if tar is not None:
                member = tar.extractfile(f"{folder}/{name}")
                if member is None:
                    raise DataError(f"{src} has no member {folder}/{name}")
                d = pickle.load(member, encoding="bytes")
            else:
                with open(src / name, "rb") as f:
                    d = pickle.load(f, encoding="bytes")
            if b"data" not in d or label_key not in d:
                raise DataError(f"{src}/{name}: expected keys b'data' and {label_key!r}, found {sorted(d)}")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
    except KeyError as exc:
        raise DataError(f"{src}: {exc}") from exc
    finally:
        if tar is not None:
            tar.close()
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _cifar(dataset: str, data_dir: Optional[str], size: int, channels: int) -> DataBundle:
    spec = _CIFAR[dataset]
    label = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]
    if channels != 3:
        raise UsageError(f"{label} images have 3 channels; use --in-channels 3")
    kind, src = _cifar_source(spec, data_dir, label)
    xtr, ytr = _read_cifar_pickles(kind, src, spec["folder"], spec["train"], spec["label_key"])
    xte, yte = _read_cifar_pickles(kind, src, spec["folder"], spec["test"], spec["label_key"])
    train_tf = BatchTransform(size, 3, pad=4, flip=True, mean=spec["mean"], std=spec["std"])
    test_tf = BatchTransform(size, 3, mean=spec["mean"], std=spec["std"])
    return DataBundle(dataset, TensorImageDataset(xtr, ytr), TensorImageDataset(xte, yte), spec["num_classes"], 3, size,
                      train_tf, test_tf)


# ------------------------------------------------------------------------------ ImageFolder
def _scan(split_dir: Path, class_to_idx: Optional[dict] = None):
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in classes:
        if c not in class_to_idx:
            raise DataError(f"{split_dir / c}: class {c!r} does not occur in the train split")
        for root, _, files in os.walk(split_dir / c, followlinks=True):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(root, f), class_to_idx[c]))
    return samples, class_to_idx


def _imagefolder(data_dir: Optional[str], size: int, channels: int) -> DataBundle:
    layout = ("expected <data-dir>/train/<class>/<image> and <data-dir>/val/<class>/<image> "
              f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    if not data_dir:
        raise DataError(f"--data-dir is required for imagefolder: {layout}")
    root = Path(data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagefolder: {root / split} is not a directory; {layout}")
    train, class_to_idx = _scan(root / "train")
    if not class_to_idx:
        raise DataError(f"imagefolder: no class folders in {root / 'train'}; {layout}")
    val, _ = _scan(root / "val", class_to_idx)
    for split, samples in (("train", train), ("val", val)):
        if not samples:
            raise DataError(f"imagefolder: no images under {root / split}; {layout}")
    mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
    train_tf = BatchTransform(size, channels, pad=max(size // 8, 1), flip=True, mean=mean, std=std)
    test_tf = BatchTransform(size, channels, mean=mean, std=std)
    return DataBundle("imagefolder", ImageFolderDataset(train, size, channels), ImageFolderDataset(val, size, channels),
                      len(class_to_idx), channels, size, train_tf, test_tf, classes=sorted(class_to_idx, key=class_to_idx.get))
