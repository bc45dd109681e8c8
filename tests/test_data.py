"""Tests of dana.data: dataset readers, checksums, data-dir resolution, download, loaders."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dana.data import (
    DATASETS,
    Dataset,
    TrainLoader,
    download,
    eval_batches,
    load_dataset,
    resolve_data_dir,
)
from dana.data import datasets as ds
from dana.errors import DanaError

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _find_shared_data() -> Path | None:
    """``$DANA_DATA`` or ``<repo>/../shared/data``, whichever holds the shipped MNIST."""
    repo = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("DANA_DATA"), repo / ".." / "shared" / "data"):
        if candidate and (Path(candidate) / "mnist" / IDX_FILES[0]).is_file():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="module")
def shared_data() -> Path:
    found = _find_shared_data()
    if found is None:
        pytest.skip("shipped MNIST/Fashion-MNIST not found (set DANA_DATA)")
    return found


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _one_line_error(excinfo: pytest.ExceptionInfo[DanaError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- IDX sets: the real files -------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("train", [True, False])
def test_real_idx_sets_load(shared_data: Path, name: str, train: bool) -> None:
    data = load_dataset(name, shared_data, train=train)
    n = 60000 if train else 10000
    assert len(data) == n and data.name == name and data.num_classes == 10
    assert data.images.shape == (n, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.images.is_contiguous()
    assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
    assert set(data.labels.unique().tolist()) == set(range(10))
    assert len(data.mean) == len(data.std) == 1
    # The published statistics are those of the training images.
    if train:
        pixels = data.images.float() / 255
        assert pixels.mean().item() == pytest.approx(data.mean[0], abs=5e-4)
        assert pixels.std().item() == pytest.approx(data.std[0], abs=5e-4)
    # In-process cache: a second load (same resolved root) returns the same object.
    assert load_dataset(name, shared_data / ".." / shared_data.name, train=train) is data


def test_resolve_data_dir_finds_shared_data_from_repo_root(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DANA_DATA", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert resolve_data_dir(None) == shared_data


def test_corrupt_copy_fails_checksum(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for file in IDX_FILES:
        shutil.copyfile(shared_data / "mnist" / file, folder / file)
    target = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))

    with pytest.raises(DanaError) as excinfo:
        load_dataset("mnist", tmp_path, train=False)
    message = _one_line_error(excinfo)
    assert "checksum" in message and "t10k-images-idx3-ubyte.gz" in message
    # Without verification the gzip CRC still catches it.
    with pytest.raises(DanaError, match="corrupt"):
        load_dataset("mnist", tmp_path, train=False, verify=False)
    # Only the files of the split read are checked: the intact training split loads.
    assert len(load_dataset("mnist", tmp_path, train=True)) == 60000


# --- IDX sets: fixtures -------------------------------------------------------------------


def _idx(array: np.ndarray, magic: bytes | None = None, extra: bytes = b"") -> bytes:
    header = magic or bytes((0, 0, 0x08, array.ndim))
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + dims + array.astype(np.uint8).tobytes() + extra)


def _write_idx_set(root: Path, n: int = 12, **overrides: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A small Fashion-MNIST-shaped set (train and test alike); ``overrides`` maps a file
    stem (``train_images`` ...) to replacement bytes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    for file in IDX_FILES:
        key = file.split("-idx")[0].replace("t10k", "test").replace("-", "_")
        default = _idx(images if "images" in file else labels)
        (folder / file).write_bytes(overrides.get(key, default))
    return images, labels


def test_idx_fixture_reads_back(tmp_path: Path) -> None:
    images, labels = _write_idx_set(tmp_path)
    data = load_dataset("fashion-mnist", tmp_path, train=False, verify=False)
    assert data.images.shape == (12, 1, 28, 28)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.labels, torch.from_numpy(labels.astype(np.int64)))
    with pytest.raises(DanaError, match="checksum"):
        load_dataset("fashion-mnist", tmp_path, train=False)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"test_images": _idx(np.zeros((12, 28, 28)), magic=b"\0\0\x08\x02")}, "magic"),
        ({"test_images": _idx(np.zeros((12, 28, 28)), magic=b"\0\0\x0d\x03")}, "magic"),
        ({"test_labels": _idx(np.zeros((12, 28, 28)))}, "magic"),
        ({"test_images": _idx(np.zeros((12, 28, 28)))[:-9]}, "gzip"),  # truncated gzip
        ({"test_images": gzip.compress(gzip.decompress(_idx(np.zeros((12, 28, 28))))[:-5])}, "IDX"),
        ({"test_images": _idx(np.zeros((12, 28, 28)), extra=b"x")}, "IDX"),
        ({"test_images": _idx(np.zeros((12, 32, 32)))}, "shape"),
        ({"test_labels": _idx(np.zeros(11))}, "11 labels for 12 images"),
        ({"test_labels": _idx(np.full(12, 10))}, "out of range"),
        ({"test_images": b"not gzip at all"}, "gzip"),
    ],
)
def test_malformed_idx_is_a_dana_error(
    tmp_path: Path, override: dict[str, bytes], match: str
) -> None:
    _write_idx_set(tmp_path, **override)
    with pytest.raises(DanaError, match=match) as excinfo:
        load_dataset("fashion-mnist", tmp_path, train=False, verify=False)
    assert "corrupt" in _one_line_error(excinfo)


def test_missing_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DanaError) as excinfo:
        load_dataset("fashion-mnist", tmp_path, train=True)
    message = _one_line_error(excinfo)
    assert "Fashion-MNIST not found" in message and str(tmp_path) in message
    assert "fashion-mnist/train-images-idx3-ubyte.gz" in message
    assert "--data-dir" in message and "--download" in message


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(DanaError, match="choose one of mnist, fashion-mnist, cifar10, cifar100"):
        load_dataset("imagenet", tmp_path, train=True)
    with pytest.raises(DanaError, match="unknown dataset"):
        download("svhn", tmp_path)
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "cifar100")


# --- CIFAR fixtures -----------------------------------------------------------------------


def _cifar_batch(n: int, offset: int, classes: int, rng: np.random.Generator) -> dict:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(x) for x in (np.arange(n) + offset) % classes]
    batch = {b"batch_label": b"fixture", b"data": data, b"filenames": [b"x.png"] * n}
    if classes == 10:
        batch[b"labels"] = labels
    else:
        batch[b"fine_labels"] = labels
        batch[b"coarse_labels"] = [x // 5 for x in labels]
    return batch


def _write_cifar(root: Path, name: str, n: int = 20) -> dict[str, dict]:
    """The python-version folder of ``name`` with ``n`` images per batch; returns the batches."""
    rng = np.random.default_rng(1)
    spec = ds._SPECS[name]
    folder = root / spec.folder
    folder.mkdir(parents=True)
    batches = {}
    for i, file in enumerate(spec.train + spec.test):
        batches[file] = _cifar_batch(n, 7 * i, spec.num_classes, rng)
        # Protocol 2 as the published (Python 2) files; the newest one for the test batch.
        protocol = 2 if file in spec.train else pickle.HIGHEST_PROTOCOL
        (folder / file).write_bytes(pickle.dumps(batches[file], protocol=protocol))
    meta = "batches.meta" if name == "cifar10" else "meta"
    (folder / meta).write_bytes(pickle.dumps({b"label_names": [b"a"]}, protocol=2))
    return batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_fixture_reads_back(tmp_path: Path, name: str) -> None:
    batches = _write_cifar(tmp_path, name)
    spec = ds._SPECS[name]
    train = load_dataset(name, tmp_path, train=True, verify=False)
    test = load_dataset(name, tmp_path, train=False, verify=False)
    assert len(train) == 20 * len(spec.train) and len(test) == 20
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert train.num_classes == spec.num_classes and len(train.mean) == 3

    first = batches[spec.train[0]]
    row = first[b"data"][3]
    # A row is the red plane, then green, then blue, each 32x32 row-major.
    assert train.images[3, 0, 0, 0].item() == row[0]
    assert train.images[3, 0, 1, 2].item() == row[32 + 2]
    assert train.images[3, 1, 5, 7].item() == row[1024 + 5 * 32 + 7]
    assert train.images[3, 2, 31, 31].item() == row[3071]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    expected = np.concatenate([batches[f][key] for f in spec.train])
    assert train.labels.tolist() == expected.tolist()
    last = batches[spec.test[0]][b"data"]
    assert torch.equal(test.images.reshape(20, -1), torch.from_numpy(last))

    with pytest.raises(DanaError, match="checksum") as excinfo:
        load_dataset(name, tmp_path, train=False)
    _one_line_error(excinfo)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # unpickling would call os.getcwd()
            return (os.getcwd, ())

    _write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DanaError, match="refusing to load"):
        load_dataset("cifar10", tmp_path, train=False, verify=False)


def test_cifar_malformed_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar100")
    bad = {b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0] * 4}
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps(bad))
    with pytest.raises(DanaError, match="corrupt"):
        load_dataset("cifar100", tmp_path, train=False, verify=False)


# --- Data directory -----------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "work" / "repo"
    cwd.mkdir(parents=True)
    shared = tmp_path / "work" / "shared" / "data"
    shared.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ds, "_REPO_DATA_DIR", tmp_path / "checkout" / "shared" / "data")
    monkeypatch.setenv("DANA_DATA", str(tmp_path / "env"))

    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.setenv("DANA_DATA", "")  # empty means unset
    assert resolve_data_dir(None) == shared.resolve()
    monkeypatch.delenv("DANA_DATA")
    assert resolve_data_dir(None) == shared.resolve()
    shared.rmdir()
    (tmp_path / "checkout" / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir(None) == (tmp_path / "checkout" / "shared" / "data").resolve()
    (tmp_path / "checkout" / "shared" / "data").rmdir()
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "dana"


# --- Download -----------------------------------------------------------------------------


def test_download_idx_from_file_url(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ds.URLS, "mnist", (shared_data / "mnist").as_uri() + "/")
    download("mnist", tmp_path / "cache")
    folder = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(IDX_FILES)
    assert len(load_dataset("mnist", tmp_path / "cache", train=False)) == 10000
    # Present and valid files are not fetched again.
    monkeypatch.setitem(ds.URLS, "mnist", (tmp_path / "nowhere").as_uri() + "/")
    download("mnist", tmp_path / "cache")


def test_download_checksum_mismatch_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_idx_set(tmp_path / "server")
    monkeypatch.setitem(
        ds.URLS, "fashion-mnist", (tmp_path / "server" / "fashion-mnist").as_uri() + "/"
    )
    with pytest.raises(DanaError, match="checksum mismatch") as excinfo:
        download("fashion-mnist", tmp_path / "cache")
    _one_line_error(excinfo)
    assert list((tmp_path / "cache" / "fashion-mnist").iterdir()) == []


def test_download_network_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ds.URLS, "cifar10", (tmp_path / "missing").as_uri() + "/")
    with pytest.raises(DanaError, match="could not download") as excinfo:
        download("cifar10", tmp_path / "cache")
    _one_line_error(excinfo)
    assert list((tmp_path / "cache").iterdir()) == []


def _tarball(path: Path, source: Path, arcname: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return _md5(path)


def test_download_cifar_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cifar(tmp_path / "src", "cifar10")
    server = tmp_path / "server"
    server.mkdir()
    folder = tmp_path / "src" / "cifar-10-batches-py"
    archive = server / "cifar-10-python.tar.gz"
    tar_md5 = _tarball(archive, folder, "cifar-10-batches-py")
    monkeypatch.setitem(ds.URLS, "cifar10", server.as_uri() + "/")

    # The fixture is not the published tarball: its checksum is refused.
    with pytest.raises(DanaError, match="checksum mismatch"):
        download("cifar10", tmp_path / "cache")
    assert not (tmp_path / "cache" / "cifar-10-python.tar.gz").exists()

    # With the fixture's checksums registered, it downloads, extracts and verifies.
    spec = ds._SPECS["cifar10"]
    sums = {f: (_md5(folder / f),) for f in spec.md5}
    patched = dataclasses.replace(spec, archive_md5=tar_md5, md5=sums)
    monkeypatch.setitem(ds._SPECS, "cifar10", patched)
    download("cifar10", tmp_path / "cache")
    assert len(load_dataset("cifar10", tmp_path / "cache", train=True)) == 100


def test_download_refuses_unsafe_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = tmp_path / "server"
    server.mkdir()
    archive = server / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    monkeypatch.setitem(ds.URLS, "cifar100", server.as_uri() + "/")
    spec = dataclasses.replace(ds._SPECS["cifar100"], archive_md5=_md5(archive))
    monkeypatch.setitem(ds._SPECS, "cifar100", spec)
    with pytest.raises(DanaError, match="cannot extract"):
        download("cifar100", tmp_path / "cache")
    assert not (tmp_path / "escaped").exists()


# --- Dataset ------------------------------------------------------------------------------


def _toy(n: int = 100, channels: int = 3, size: int = 8, **kw) -> Dataset:
    """Random images in 1..255 (so zero padding is recognisable); label i marks sample i."""
    gen = torch.Generator().manual_seed(123)
    images = torch.randint(1, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    stats = {"mean": (0.5, 0.4, 0.3)[:channels], "std": (0.2, 0.25, 0.3)[:channels]}
    return Dataset("toy", images, torch.arange(n), n, **(stats | kw))


def test_dataset_subset_and_validation() -> None:
    data = _toy(10)
    head = data.subset(4)
    assert len(head) == 4 and torch.equal(head.images, data.images[:4])
    assert head.labels.tolist() == [0, 1, 2, 3] and head.mean == data.mean
    assert len(data.subset(10)) == 10
    for k in (0, 11):
        with pytest.raises(DanaError, match="choose a number from 1 to 10"):
            data.subset(k)
    with pytest.raises(DanaError, match="uint8"):
        Dataset("x", data.images.float(), data.labels, 10, data.mean, data.std)
    with pytest.raises(DanaError, match="int64"):
        Dataset("x", data.images, data.labels[:5], 10, data.mean, data.std)
    with pytest.raises(DanaError, match="per channel"):
        Dataset("x", data.images, data.labels, 10, (0.5,), (0.2,))


# --- Loaders ------------------------------------------------------------------------------


def _epoch(loader: TrainLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("augment", ["none", "crop-flip"])
def test_loader_is_deterministic_per_seed_and_epoch(augment: str) -> None:
    data = _toy()
    fresh = TrainLoader(data, 10, augment=augment, seed=5)
    used = TrainLoader(data, 10, augment=augment, seed=5)
    for epoch in (0, 1, 7):  # what ran before must not matter
        _epoch(used, epoch)
    assert _same(_epoch(fresh, 3), _epoch(used, 3))
    assert not _same(_epoch(fresh, 3), _epoch(fresh, 4))
    assert not _same(_epoch(fresh, 3), _epoch(TrainLoader(data, 10, augment=augment, seed=6), 3))


def test_loader_visits_every_sample_once_per_epoch() -> None:
    data = _toy(100)
    loader = TrainLoader(data, 10)
    assert loader.batches_per_epoch == 10
    for epoch in range(3):
        batches = _epoch(loader, epoch)
        assert len(batches) == 10
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == list(range(100))
        assert labels.tolist() != list(range(100))  # shuffled
        for x, y in batches:  # no augmentation: each image is its sample, normalised
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            torch.testing.assert_close(x, _reference_normalise(data, data.images[y]))
    # The last partial batch is dropped: 97 samples, 9 batches of 10, 90 distinct samples.
    partial = TrainLoader(data.subset(97), 10)
    labels = torch.cat([y for _, y in partial.epoch(0)])
    assert partial.batches_per_epoch == 9 and len(set(labels.tolist())) == 90


def test_loader_batch_random_access_matches_iteration() -> None:
    loader = TrainLoader(_toy(), 16, augment="crop-flip", seed=2)
    epoch_2 = _epoch(loader, 2)
    for index in (5, 0, 3):
        x, y = loader.batch(2, index)
        assert torch.equal(x, epoch_2[index][0]) and torch.equal(y, epoch_2[index][1])
    loader.batch(9, 0)  # another epoch in between: the cached plan is replaced
    assert torch.equal(loader.batch(2, 4)[0], epoch_2[4][0])
    for index in (-1, loader.batches_per_epoch):
        with pytest.raises(IndexError):
            loader.batch(2, index)


def test_loader_rejects_bad_arguments() -> None:
    data = _toy(20)
    with pytest.raises(DanaError, match="lower the batch size or use more samples"):
        TrainLoader(data, 21)
    with pytest.raises(DanaError, match="at least 1"):
        TrainLoader(data, 0)
    with pytest.raises(DanaError, match="choose one of none, crop-flip"):
        TrainLoader(data, 4, augment="mixup")
    with pytest.raises(DanaError, match="at least 1"):
        next(eval_batches(data, 0))


def _reference_normalise(data: Dataset, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def _reference_crops(image: np.ndarray) -> dict[tuple[int, int, bool], np.ndarray]:
    """Every 4-pixel zero-padded crop of ``image`` (C, H, W), mirrored or not, by hand."""
    _, h, w = image.shape
    padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))
    crops = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy : dy + h, dx : dx + w]
            crops[(dy, dx, False)] = crop
            crops[(dy, dx, True)] = crop[:, :, ::-1]
    return crops


def test_crop_flip_is_a_shifted_mirrored_copy_of_the_padded_image() -> None:
    data = _toy(100)
    loader = TrainLoader(data, 25, augment="crop-flip", seed=3)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    seen = []
    for epoch in range(2):
        for x, y in loader.epoch(epoch):
            pixels = ((x * std + mean) * 255).round().to(torch.uint8).numpy()
            for out, sample in zip(pixels, y.tolist(), strict=True):
                crops = _reference_crops(data.images[sample].numpy())
                matches = [key for key, crop in crops.items() if np.array_equal(out, crop)]
                assert len(matches) == 1, f"sample {sample}: {len(matches)} matching crops"
                seen.append(matches[0])
    offsets = {dy for dy, _, _ in seen} | {dx for _, dx, _ in seen}
    assert offsets == set(range(9))
    flipped = sum(flip for _, _, flip in seen) / len(seen)
    assert 0.35 < flipped < 0.65
    assert sum(dy == dx == 4 and not flip for dy, dx, flip in seen) < len(seen) / 10


def test_normalisation_values() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    data = Dataset("px", images.contiguous(), torch.zeros(3, dtype=torch.int64), 1, (0.2,), (0.5,))
    (x, _), *_ = eval_batches(data)
    torch.testing.assert_close(x[:, 0, 0, 0], torch.tensor([-0.4, 0.0, 1.6]))
    assert x.shape == (3, 1, 2, 2) and x.dtype == torch.float32
    for xb, _ in TrainLoader(data, 3).epoch(0):
        assert sorted(xb[:, 0, 1, 1].tolist()) == pytest.approx([-0.4, 0.0, 1.6], abs=1e-6)


def test_eval_batches_cover_every_sample_in_order() -> None:
    data = _toy(105)
    batches = list(eval_batches(data, batch_size=20))
    assert [len(y) for _, y in batches] == [20, 20, 20, 20, 20, 5]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(105))
    images = torch.cat([x for x, _ in batches])
    torch.testing.assert_close(images, _reference_normalise(data, data.images))
    assert len(list(eval_batches(data))) == 1
