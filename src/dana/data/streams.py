"""The one shared stream of training batches, for any data a user brings, and evaluation batches.

Every training stream has the same contract as :class:`~dana.data.loader.TrainLoader`:
``batches_per_epoch``, ``batch(epoch, index)`` and ``epoch(epoch)``; the k-th gradient of a
run gets the k-th batch, and an epoch's batches depend on ``(seed, epoch)`` alone, so a run
resumed at an epoch sees exactly what the uninterrupted run saw. Three kinds of data:

- :class:`~dana.data.Dataset` (uint8 images): :class:`TrainLoader` (normalisation and batched
  augmentation on the device);
- tensors (a tuple or dict of tensors with one leading sample dimension, or a
  ``TensorDataset``): :class:`TensorStream`, one index gather per tensor on the device;
- any map-style ``torch.utils.data.Dataset`` (``__getitem__`` and ``__len__``), or a
  ``DataLoader`` (its dataset and collate function; its sampler is replaced by the seeded
  one): :class:`MapStream`, which collates each batch, optionally in DataLoader worker
  processes. Every batch is fetched with torch's, numpy's and Python's global generators
  seeded by ``(seed, epoch, index)``, so random transforms inside the dataset are
  reproducible too, whatever the process (see :func:`fetch_seeded`).

All three draw the order of an epoch with :func:`epoch_order`, so the same samples give the
same batches through every path.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from dana.errors import DanaError

__all__ = [
    "MapStream",
    "TensorStream",
    "batch_size_of",
    "epoch_generator",
    "epoch_order",
    "eval_stream",
    "sample_count",
    "subset",
    "to_device",
    "train_stream",
]

#: A batch: any nest of tuples, lists and dicts whose tensors have the batch as leading dim.
Batch = Any


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``(seed, epoch)`` alone (no collisions in practice,
    unlike ``seed * K + epoch``)."""
    digest = hashlib.blake2b(f"dana.loader:{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def epoch_order(generator: torch.Generator, samples: int) -> Tensor:
    """The order in which an epoch visits ``samples`` samples (first draw of its generator)."""
    return torch.randperm(samples, generator=generator)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """``batch`` with every tensor moved to ``device`` (other leaves as they are)."""
    device = torch.device(device)
    return tree_map(
        lambda x: x.to(device, non_blocking=True) if isinstance(x, Tensor) else x, batch
    )


def batch_size_of(batch: Batch) -> int:
    """The number of samples in ``batch``: the leading size of its first tensor."""
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    raise DanaError("a batch must hold at least one tensor with a leading batch dimension")


def _check_batch_size(batch_size: int, samples: int, what: str) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DanaError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if samples < batch_size:
        raise DanaError(
            f"batch size {batch_size} exceeds the {samples} training samples of {what}: "
            "lower the batch size or use more samples"
        )


class _Stream:
    """Shared plumbing: batches per epoch, the epoch iterator, the epoch's order."""

    samples: int
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch; the last partial batch is dropped."""
        return self.samples // self.batch_size

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch`` in order."""
        for index in range(self.batches_per_epoch):
            yield self.batch(epoch, index)

    def batch(self, epoch: int, index: int) -> Batch:
        raise NotImplementedError

    def _indices(self, epoch: int, index: int) -> Tensor:
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} out of range [0, {self.batches_per_epoch})")
        if self._order_epoch != epoch:
            self._order = epoch_order(epoch_generator(self.seed, epoch), self.samples)
            self._order_epoch = epoch
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]

    _order_epoch: int | None = None
    _order: Tensor = torch.empty(0)


def _tensors_of(data: Any) -> tuple[Any, list[Tensor]] | None:
    """``(structure, tensors)`` when ``data`` is tensor data (tuple/list/dict of tensors with
    one leading size, one tensor, or a ``TensorDataset``); else ``None``."""
    if isinstance(data, torch.utils.data.TensorDataset):
        data = tuple(data.tensors)
    if isinstance(data, Tensor):
        data = (data,)
    if isinstance(data, Mapping | tuple | list) and data:
        values = list(data.values()) if isinstance(data, Mapping) else list(data)
        if all(isinstance(v, Tensor) and v.dim() > 0 for v in values):
            sizes = {v.shape[0] for v in values}
            if len(sizes) != 1:
                raise DanaError(
                    f"tensor data needs one leading sample dimension, got sizes {sorted(sizes)}"
                )
            return data, values
    return None


def _like(structure: Any, tensors: list[Tensor]) -> Any:
    """``tensors`` in the structure of the tensor data they came from: a dict with its keys,
    a list, or a tuple."""
    if isinstance(structure, Mapping):
        return dict(zip(structure, tensors, strict=True))
    return tensors if isinstance(structure, list) else tuple(tensors)


class TensorStream(_Stream):
    """Batches of in-memory tensors: one gather per tensor, on the device (the fast path).

    Args:
        data: a tuple, list or dict of tensors (or a ``TensorDataset``) sharing their
            leading (sample) size; copied to ``device`` once. A batch has the same structure.
        batch_size, seed, device: as in :class:`~dana.data.loader.TrainLoader`.
    """

    def __init__(
        self, data: Any, batch_size: int, *, seed: int = 0, device: torch.device | str = "cpu"
    ) -> None:
        found = _tensors_of(data)
        if found is None:
            raise DanaError("TensorStream needs a tuple, list or dict of tensors")
        structure, tensors = found
        self.device = torch.device(device)
        self.samples = tensors[0].shape[0]
        _check_batch_size(batch_size, self.samples, "the tensors")
        self.batch_size = batch_size
        self.seed = seed
        self._tensors = [t.to(self.device) for t in tensors]
        self._structure = structure

    def batch(self, epoch: int, index: int) -> Batch:
        rows = self._indices(epoch, index)
        if self.device.type != "cpu":
            # The epoch's order goes to the device once, not once (with a sync) per batch.
            if self._device_epoch != epoch:
                self._device_order, self._device_epoch = self._order.to(self.device), epoch
            rows = self._device_order[index * self.batch_size : (index + 1) * self.batch_size]
        return _like(self._structure, [t[rows] for t in self._tensors])

    _device_epoch: int | None = None
    _device_order: Tensor = torch.empty(0)


class _SeededBatches(torch.utils.data.Dataset):
    """Item ``i`` is batch ``i`` of one epoch, collated under a random state of its own."""

    def __init__(
        self, dataset: Any, collate: Callable[[list[Any]], Batch], order: Tensor, stream: Any
    ) -> None:
        self.dataset, self.collate, self.order = dataset, collate, order
        self.batch_size, self.seed, self.epoch = stream.batch_size, stream.seed, stream._epoch

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, index: int) -> Batch:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        return fetch_seeded(self.dataset, self.collate, rows, (self.seed, self.epoch, index))


def fetch_seeded(
    dataset: Any, collate: Callable[[list[Any]], Batch], rows: Sequence[int], key: tuple
) -> Batch:
    """``collate([dataset[i] for i in rows])`` with the global random generators seeded from
    ``key``: torch's CPU generator for the call (its state is restored afterwards, so the
    model's dropout draws do not depend on the data), numpy's and Python's left seeded."""
    digest = hashlib.blake2b(f"dana.batch:{key}".encode(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little") >> 33  # numpy wants < 2**32
    # torch.manual_seed would also seed every accelerator (~1 ms); the CPU generator is µs.
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    try:
        return collate([dataset[i] for i in rows])
    finally:
        generator.set_state(saved)


class MapStream(_Stream):
    """Batches of any map-style dataset, collated (the general path).

    Args:
        dataset: anything with ``__len__`` and ``__getitem__(int)``.
        batch_size, seed, device: as in :class:`~dana.data.loader.TrainLoader`.
        collate: turns a list of samples into a batch [default:
            ``torch.utils.data.default_collate``].
        num_workers: DataLoader worker processes that collate an epoch's batches ahead
            (0: in this process). The batches do not depend on it.
        pin_memory: pin batches for faster copies to a GPU.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        collate: Callable[[list[Any]], Batch] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise DanaError(
                f"cannot train on a {type(dataset).__name__}: give a map-style Dataset "
                "(with __len__ and __getitem__), a DataLoader over one, or tensors"
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise DanaError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.dataset = dataset
        self.samples = len(dataset)
        _check_batch_size(batch_size, self.samples, type(dataset).__name__)
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.collate = collate or torch.utils.data.default_collate
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._epoch = -1

    def batch(self, epoch: int, index: int) -> Batch:
        rows = self._indices(epoch, index).tolist()
        batch = fetch_seeded(self.dataset, self.collate, rows, (self.seed, epoch, index))
        return to_device(batch, self.device)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.num_workers == 0:
            yield from super().epoch(epoch)
            return
        self._indices(epoch, 0)
        self._epoch = epoch
        loader = torch.utils.data.DataLoader(
            _SeededBatches(self.dataset, self.collate, self._order, self),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for batch in loader:
            yield to_device(batch, self.device)


def unwrap_loader(data: Any, collate: Callable | None) -> tuple[Any, Callable | None]:
    """A DataLoader's dataset and (unless given) its collate function."""
    if isinstance(data, torch.utils.data.DataLoader):
        own = data.collate_fn
        # torch's default collate of tensors is the fast path's gather: keep that path.
        return data.dataset, collate or (None if own is torch.utils.data.default_collate else own)
    return data, collate


def train_stream(
    data: Any,
    batch_size: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    augment: str = "none",
    collate: Callable[[list[Any]], Batch] | None = None,
    num_workers: int = 0,
) -> Any:
    """The seeded stream of training batches for ``data`` of any kind (module docstring)."""
    from dana.data.datasets import Dataset
    from dana.data.loader import TrainLoader

    if isinstance(data, Dataset):
        return TrainLoader(data, batch_size, augment=augment, seed=seed, device=device)
    if augment != "none":
        raise DanaError(
            f"augment={augment!r} applies to image Datasets only: augment inside your "
            "dataset or loss instead"
        )
    data, collate = unwrap_loader(data, collate)
    if collate is None and _tensors_of(data) is not None:
        return TensorStream(data, batch_size, seed=seed, device=device)
    return MapStream(
        data, batch_size, seed=seed, device=device, collate=collate, num_workers=num_workers
    )


def sample_count(data: Any) -> int:
    """How many samples ``data`` (of any kind :func:`train_stream` takes) holds."""
    data, _ = unwrap_loader(data, None)
    found = _tensors_of(data)
    return found[1][0].shape[0] if found is not None else len(data)


def eval_stream(
    data: Any,
    batch_size: int = 1000,
    *,
    device: torch.device | str = "cpu",
    collate: Callable[[list[Any]], Batch] | None = None,
) -> Iterator[Batch]:
    """Every sample of ``data`` once, in order, not augmented; the last batch may be short."""
    from dana.data.datasets import Dataset
    from dana.data.loader import eval_batches

    if isinstance(data, Dataset):
        yield from eval_batches(data, batch_size, device=device)
        return
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DanaError(f"evaluation batch size must be at least 1, got {batch_size}")
    data, collate = unwrap_loader(data, collate)
    found = _tensors_of(data) if collate is None else None
    if found is not None:
        structure, tensors = found
        for start in range(0, tensors[0].shape[0], batch_size):
            yield _like(structure, [t[start : start + batch_size].to(device) for t in tensors])
        return
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    for batch in loader:
        yield to_device(batch, device)


def subset(data: Any, indices: Tensor) -> Any:
    """The samples of ``data`` (any kind :func:`train_stream` takes) at ``indices``, in that
    order: copies for tensors and image Datasets, a ``Subset`` view for other datasets."""
    import dataclasses

    from dana.data.datasets import Dataset

    if isinstance(data, Dataset):
        return dataclasses.replace(
            data, images=data.images[indices].contiguous(), labels=data.labels[indices]
        )
    data, _ = unwrap_loader(data, None)
    found = _tensors_of(data)
    if found is not None:
        structure, tensors = found
        return _like(structure, [t[indices] for t in tensors])
    return torch.utils.data.Subset(data, indices.tolist())
