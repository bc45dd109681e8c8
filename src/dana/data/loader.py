"""Batches from a whole in-memory dataset, with batched augmentation and exact replay.

In the style of airbench: the ``uint8`` images live on the device as one tensor; a batch
is an index gather, an optional crop-and-flip done for the whole batch with one more
gather, and a normalisation. No per-image Python runs on the hot path.

Every random draw of an epoch (its order and its augmentation) comes from a generator
seeded by a hash of ``(seed, epoch)`` alone, so an epoch's batches are bit-identical
however many epochs ran before: a run resumed at epoch ``e``, batch ``i`` sees exactly
what the uninterrupted run saw. The draws are made on the CPU, so the order and the
crops do not depend on the device either.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from dana.data.datasets import Dataset
from dana.data.streams import epoch_generator, epoch_order
from dana.errors import DanaError

__all__ = ["AUGMENTATIONS", "TrainLoader", "eval_batches"]

AUGMENTATIONS: tuple[str, ...] = ("none", "crop-flip")
"""The values :class:`TrainLoader` accepts for ``augment``."""

_PAD = 4  # crop-flip: zero padding on each side, so offsets range over 0..2*_PAD


class TrainLoader:
    """Shuffled, optionally augmented training batches of a :class:`Dataset`.

    Args:
        dataset: the training set; its images are copied to ``device`` once.
        batch_size: samples per batch; the last partial batch of an epoch is dropped.
        augment: ``"none"``, or ``"crop-flip"``: pad each image with 4 zero pixels on
            every side, take a random crop of the original size, and mirror it
            horizontally with probability 1/2 (the standard CIFAR augmentation).
        seed: with the epoch number, determines every random draw of that epoch.
        device: where the data lives and batches are produced.

    Raises:
        DanaError: unknown ``augment``, ``batch_size`` below 1 or above the dataset size.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        augment: str = "none",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise DanaError(
                f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}"
            )
        if batch_size < 1:
            raise DanaError(f"batch size must be at least 1, got {batch_size}")
        if len(dataset) < batch_size:
            raise DanaError(
                f"batch size {batch_size} exceeds the {len(dataset)} training samples of "
                f"{dataset.name}: lower the batch size or use more samples"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.device = torch.device(device)
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)
        self._mean, self._std = _stats(dataset, self.device)
        self._plan_epoch: int | None = None
        self._order = self._shifts = self._flips = torch.empty(0)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch: ``len(dataset) // batch_size``."""
        return len(self.dataset) // self.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``epoch`` in order: ``float32`` images ``(B, C, H, W)``, ``int64``
        labels ``(B,)``, both on the loader's device. Each sample appears at most once."""
        for index in range(self.batches_per_epoch):
            yield self.batch(epoch, index)

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` of ``epoch``: the same tensors :meth:`epoch` yields at that position.

        The epoch's draws are computed once and kept while consecutive calls ask for the
        same epoch.

        Raises:
            IndexError: ``index`` outside ``[0, batches_per_epoch)`` (a caller bug).
        """
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} out of range [0, {self.batches_per_epoch})")
        if self._plan_epoch != epoch:
            self._plan(epoch)
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        samples = self._order[window]
        images = self._images[samples]
        if self.augment == "crop-flip":
            images = _crop_flip(images, self._shifts[window], self._flips[window])
        return _normalise(images, self._mean, self._std), self._labels[samples]

    def _plan(self, epoch: int) -> None:
        """Draw the order and the augmentation of every position of ``epoch``."""
        n = len(self.dataset)
        generator = epoch_generator(self.seed, epoch)
        self._order = epoch_order(generator, n).to(self.device)
        if self.augment == "crop-flip":
            shifts = torch.randint(0, 2 * _PAD + 1, (n, 2), generator=generator)
            flips = torch.rand(n, generator=generator) < 0.5
            self._shifts, self._flips = shifts.to(self.device), flips.to(self.device)
        self._plan_epoch = epoch


def eval_batches(
    dataset: Dataset, batch_size: int = 1000, device: torch.device | str = "cpu"
) -> Iterator[tuple[Tensor, Tensor]]:
    """Every sample once, in order, normalised, not augmented; the last batch may be short.

    Yields ``float32`` images ``(B, C, H, W)`` and ``int64`` labels ``(B,)`` on ``device``.
    """
    if batch_size < 1:
        raise DanaError(f"evaluation batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    mean, std = _stats(dataset, device)
    for start in range(0, len(dataset), batch_size):
        stop = start + batch_size
        images = dataset.images[start:stop].to(device, non_blocking=True)
        yield _normalise(images, mean, std), dataset.labels[start:stop].to(device)


def _stats(dataset: Dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    """The dataset's mean and std as ``(1, C, 1, 1)`` float32 tensors on ``device``."""
    mean = torch.tensor(dataset.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(uint8 / 255 - mean) / std`` per channel, in float32."""
    return (images.float() / 255 - mean) / std


def _crop_flip(images: Tensor, shifts: Tensor, flips: Tensor) -> Tensor:
    """Crop each zero-padded image at its ``(row, col)`` offset and mirror where ``flips``.

    Output pixel ``(b, c, i, j)`` is padded pixel ``(b, c, dy_b + i, dx_b + j)``, or
    ``(b, c, dy_b + i, dx_b + W - 1 - j)`` when flipped: one gather over flattened
    images for the whole batch (several times faster than 4-D advanced indexing).
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (_PAD, _PAD, _PAD, _PAD))
    device = images.device
    cols = torch.arange(w, device=device)
    cols = shifts[:, 1:] + torch.where(flips[:, None], w - 1 - cols, cols)  # (B, W)
    rows = shifts[:, :1] + torch.arange(h, device=device)  # (B, H)
    flat = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).view(b, 1, h * w)
    return padded.view(b, c, -1).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)
