"""Image classification datasets as whole in-memory tensors, read from their published files.

Four sets are known (:data:`DATASETS`), each in the layout its creators publish, under one
data directory:

========================  =========================  ===========================================
name                      folder under the root      files
========================  =========================  ===========================================
``mnist``                 ``mnist/``                 four gzipped IDX files
``fashion-mnist``         ``fashion-mnist/``         four gzipped IDX files (same names)
``cifar10``               ``cifar-10-batches-py/``   ``data_batch_1..5``, ``test_batch``, meta
``cifar100``              ``cifar-100-python/``      ``train``, ``test``, ``meta``
========================  =========================  ===========================================

Every file read is checked against its published MD5 unless ``verify=False``; a missing,
corrupt or altered file raises :class:`~dana.errors.DanaError` with a one-line message
that says what to do. :func:`download` fetches a set from its home page.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dana.errors import DanaError

__all__ = ["DATASETS", "URLS", "Dataset", "download", "load_dataset", "resolve_data_dir"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields has no single truth value
class Dataset:
    """A labelled image set held as two tensors.

    The tensors may be shared with :func:`load_dataset`'s in-process cache and with
    other datasets (:meth:`subset` returns views): callers must treat them as read-only.

    Attributes:
        name: the dataset's name, one of :data:`DATASETS` for loaded sets.
        images: ``uint8`` pixels, shape ``(N, C, H, W)``, contiguous.
        labels: ``int64`` class indices in ``[0, num_classes)``, shape ``(N,)``.
        num_classes: number of classes.
        mean: per-channel pixel mean in ``[0, 1]`` units, for normalisation.
        std: per-channel pixel standard deviation in ``[0, 1]`` units.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.dim() != 4 or not images.is_contiguous():
            raise DanaError(
                f"dataset {self.name!r}: images must be a contiguous uint8 (N, C, H, W) tensor, "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise DanaError(
                f"dataset {self.name!r}: labels must be an int64 tensor of shape "
                f"({images.shape[0]},), got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DanaError(
                f"dataset {self.name!r}: mean and std need one value per channel ({channels})"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, k: int) -> Dataset:
        """The first ``k`` samples (views of this set's tensors, no copy).

        Raises:
            DanaError: if ``k`` is not in ``[1, len(self)]``.
        """
        if not 1 <= k <= len(self):
            raise DanaError(
                f"cannot take {k} samples of {self.name} ({len(self)} available): "
                f"choose a number from 1 to {len(self)}"
            )
        return replace(self, images=self.images[:k], labels=self.labels[:k])


@dataclass(frozen=True)
class _Spec:
    """Where a dataset's files live, what they hash to, and how to read them."""

    title: str
    folder: str
    format: Literal["idx", "cifar"]
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Files read per split: (images, labels) for IDX, the pickled batches for CIFAR.
    train: tuple[str, ...]
    test: tuple[str, ...]
    # Accepted MD5s of every file in the folder (those read and the metadata).
    md5: Mapping[str, tuple[str, ...]]
    label_key: bytes = b"labels"
    archive: str | None = None  # the tarball that holds ``folder`` (CIFAR)
    archive_md5: str = ""


_IDX_TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_IDX_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

_SPECS: dict[str, _Spec] = {
    "mnist": _Spec(
        title="MNIST",
        folder="mnist",
        format="idx",
        num_classes=10,
        image_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        train=_IDX_TRAIN,
        test=_IDX_TEST,
        md5={
            "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",),
            "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",),
            "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",),
            "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",),
        },
    ),
    "fashion-mnist": _Spec(
        title="Fashion-MNIST",
        folder="fashion-mnist",
        format="idx",
        num_classes=10,
        image_shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        train=_IDX_TRAIN,
        test=_IDX_TEST,
        # First: the files on the home page. Second: the offline copy shipped with this
        # project, recompressed (same decompressed bytes, different gzip headers).
        md5={
            "train-images-idx3-ubyte.gz": (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "cf8536b0aa1a6ac5fa3f23001093305c",
            ),
            "train-labels-idx1-ubyte.gz": (
                "25c81989df183df01b3e8a0aad5dffbe",
                "10bea18fdb374794d4bb42e356e600c9",
            ),
            "t10k-images-idx3-ubyte.gz": (
                "bef4ecab320f06d8554ea6380940ec79",
                "f78720b4224f21cce2f2ccf2d7a94c9a",
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "bb300cfdad3c16e7a12a480ee83cd310",
                "0d30e22e447f3c33dab9ed536400ac01",
            ),
        },
    ),
    "cifar10": _Spec(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        format="cifar",
        num_classes=10,
        image_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        train=_CIFAR10_TRAIN,
        test=("test_batch",),
        md5={
            "data_batch_1": ("c99cafc152244af753f735de768cd75f",),
            "data_batch_2": ("d4bba439e000b95fd0a9bffe97cbabec",),
            "data_batch_3": ("54ebc095f3ab1f0389bbae665268c751",),
            "data_batch_4": ("634d18415352ddfa80567beed471001a",),
            "data_batch_5": ("482c414d41f54cd18b22e5b47cb7c3cb",),
            "test_batch": ("40351d587109b95175f43aff81a1287e",),
            "batches.meta": ("5ff9c542aee3614f3951f8cda6e48888",),
        },
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _Spec(
        title="CIFAR-100",
        folder="cifar-100-python",
        format="cifar",
        num_classes=100,
        image_shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        train=("train",),
        test=("test",),
        md5={
            "train": ("16019d7e3df5f24257cddd939b257f8d",),
            "test": ("f0ef6b0ae62326f3e7ffdfab6717acfc",),
            "meta": ("7973b15100ade9c7d40fb424638fde48",),
        },
        label_key=b"fine_labels",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}

DATASETS: tuple[str, ...] = tuple(_SPECS)
"""The names :func:`load_dataset` and :func:`download` accept."""

URLS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
}
"""Base URL per dataset; a file's URL is the base followed by its name. Tests repoint these."""

# ``<repo>/../shared/data`` for a source checkout (this file is <repo>/src/dana/data/...).
_REPO_DATA_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
_HOME_DATA_DIR = Path("~") / ".cache" / "dana"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data directory to use, by precedence.

    1. ``data_dir`` (the ``--data-dir`` value) when given;
    2. the ``DANA_DATA`` environment variable when set and non-empty;
    3. ``../shared/data`` relative to the current working directory, if it exists;
    4. ``../shared/data`` relative to the source checkout holding this package, if it exists;
    5. ``~/.cache/dana``.

    Only candidates 3 and 4 must exist; the chosen directory is not created.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("DANA_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in (Path.cwd() / ".." / "shared" / "data", _REPO_DATA_DIR):
        if candidate.is_dir():
            return candidate.resolve()
    return _HOME_DATA_DIR.expanduser()


def load_dataset(name: str, root: str | Path, *, train: bool, verify: bool = True) -> Dataset:
    """Load the train or test split of dataset ``name`` from ``root/<folder>``.

    Results are cached in-process (keyed on the resolved root, name, split and
    ``verify``), so repeated loads return the same tensors: do not modify them. The cache
    does not notice files changing on disk.

    Args:
        name: one of :data:`DATASETS`.
        root: the data directory (see :func:`resolve_data_dir`).
        train: the training split if true, else the test split.
        verify: check each file read against its published MD5 first.

    Raises:
        DanaError: unknown name; missing, corrupt or altered file; malformed contents.
    """
    _spec(name)  # fail on an unknown name before touching the disk
    return _load_cached(name, Path(root).expanduser().resolve(), bool(train), bool(verify))


def download(name: str, root: str | Path) -> None:
    """Fetch dataset ``name`` from its home page into ``root/<folder>`` and verify it.

    Files already present with a correct MD5 are kept. Each download goes to a temporary
    file that replaces the target only once complete and verified. CIFAR tarballs are
    kept next to the extracted folder (``root/cifar-10-python.tar.gz``).

    Raises:
        DanaError: unknown name, network failure, checksum mismatch, unwritable ``root``
            or a malformed archive.
    """
    spec = _spec(name)
    root = Path(root).expanduser()
    folder = root / spec.folder
    if spec.archive is None:
        for file, sums in spec.md5.items():
            if not _is_valid(folder / file, sums):
                _fetch(URLS[name] + file, folder / file, sums)
        return
    if all(_is_valid(folder / file, sums) for file, sums in spec.md5.items()):
        return
    archive = root / spec.archive
    if not _is_valid(archive, (spec.archive_md5,)):
        _fetch(URLS[name] + spec.archive, archive, (spec.archive_md5,))
    _extract(archive, root)
    for file in spec.md5:
        _check_file(spec, root, file, verify=True)


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise DanaError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}") from None


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, root: Path, train: bool, verify: bool) -> Dataset:
    spec = _SPECS[name]
    files = spec.train if train else spec.test
    # Check every file before parsing any, so a bad set fails fast and names the culprit.
    paths = [_check_file(spec, root, file, verify) for file in files]
    if spec.format == "idx":
        images, labels = _read_idx(paths[0], ndim=3), _read_idx(paths[1], ndim=1)
    else:
        images, labels = _read_cifar(paths, spec.label_key)
    _check_contents(spec, paths[0], paths[-1], images, labels)
    return Dataset(
        name=name,
        images=torch.from_numpy(images).reshape(-1, *spec.image_shape).contiguous(),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
    )


def _check_file(spec: _Spec, root: Path, file: str, verify: bool) -> Path:
    """The path of ``file``, which must exist and, when ``verify``, hash correctly."""
    path = root / spec.folder / file
    if not path.is_file():
        raise DanaError(
            f"{spec.title} not found in {root} (expected {spec.folder}/{file}): "
            "pass --data-dir DIR or --download"
        )
    if verify:
        digest = _md5(path)
        if digest not in spec.md5[file]:
            raise DanaError(
                f"checksum mismatch for {path} (MD5 {digest}, expected {spec.md5[file][0]}): "
                "the file is corrupt or altered; delete it and rerun with --download"
            )
    return path


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_valid(path: Path, sums: tuple[str, ...]) -> bool:
    return path.is_file() and _md5(path) in sums


def _corrupt(path: Path, why: str) -> DanaError:
    return DanaError(f"{path} is corrupt ({why}): delete it and rerun with --download")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes with ``ndim`` dimensions."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"not a valid gzip file: {exc}") from None
    # Magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
    if len(raw) < 4 or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise _corrupt(path, f"bad IDX magic number {raw[:4].hex()}, expected 000008{ndim:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, "IDX header truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + math.prod(shape):
        raise _corrupt(
            path, f"IDX body has {len(raw) - header} bytes, shape {shape} needs {math.prod(shape)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays, so a tampered file cannot run code."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # NumPy 2 name
        return super().find_class(module, name)


def _read_cifar(paths: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR python-version batches: ``b'data'`` rows and ``label_key`` lists."""
    images, labels = [], []
    for path in paths:
        try:
            with path.open("rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
            data, batch_labels = batch[b"data"], np.asarray(batch[label_key])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"not a CIFAR batch: {type(exc).__name__}: {exc}") from None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise _corrupt(path, "b'data' is not a 2-D uint8 array")
        if data.shape[1] != 3 * 32 * 32 or batch_labels.shape != data.shape[:1]:
            raise _corrupt(
                path, f"data shape {data.shape} and {len(batch_labels)} labels do not match"
            )
        images.append(data)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _check_contents(
    spec: _Spec, image_path: Path, label_path: Path, images: np.ndarray, labels: np.ndarray
) -> None:
    """Image size, image/label counts and label range, whatever the format."""
    n = images.shape[0]
    if images.size != n * math.prod(spec.image_shape) or (
        spec.format == "idx" and images.shape[1:] != spec.image_shape[1:]
    ):
        raise _corrupt(
            image_path, f"images of shape {images.shape[1:]}, expected {spec.image_shape}"
        )
    if n == 0:
        raise _corrupt(image_path, "no samples")
    if labels.shape != (n,):
        raise _corrupt(label_path, f"{labels.shape[0]} labels for {n} images")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise _corrupt(label_path, "labels are not non-negative integers")
    if labels.max() >= spec.num_classes:
        raise _corrupt(
            label_path, f"label {labels.max()} out of range for {spec.num_classes} classes"
        )


def _fetch(url: str, dest: Path, sums: tuple[str, ...]) -> None:
    """Download ``url`` to ``dest`` atomically, requiring its MD5 to be one of ``sums``."""
    _log.info("downloading %s", url)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DanaError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DanaError(
                f"could not download {url}: {reason}; check the network, or fetch the file "
                f"by hand into {dest.parent}"
            ) from None
        if digest.hexdigest() not in sums:
            raise DanaError(
                f"checksum mismatch for {url} (MD5 {digest.hexdigest()}, expected {sums[0]}): "
                "the download is corrupt or the file changed upstream; try again later"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _extract(archive: Path, root: Path) -> None:
    """Extract a tarball into ``root``, refusing links, devices and paths that escape it."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, filter="data")
                return
            # Pythons without extraction filters: check members by hand.
            base = root.resolve()
            for member in tar.getmembers():
                target = (base / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(base):
                    raise tarfile.TarError(f"unsafe member {member.name!r}")
            tar.extractall(root)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _corrupt(archive, f"cannot extract: {exc}") from None
