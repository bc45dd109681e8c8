"""Datasets as in-memory tensors and the loaders that batch them.

:func:`load_dataset` reads MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 from their
published files (checksummed), :func:`download` fetches them, :func:`resolve_data_dir`
picks the data directory; :class:`TrainLoader` and :func:`eval_batches` turn a
:class:`Dataset` into normalised batches; :mod:`dana.data.streams` batches any other data
(tensors, map-style Datasets) the same seeded way.
"""

from dana.data.datasets import DATASETS, Dataset, download, load_dataset, resolve_data_dir
from dana.data.loader import TrainLoader, eval_batches
from dana.data.streams import MapStream, TensorStream, eval_stream, train_stream

__all__ = [
    "DATASETS",
    "Dataset",
    "MapStream",
    "TensorStream",
    "TrainLoader",
    "download",
    "eval_batches",
    "eval_stream",
    "load_dataset",
    "resolve_data_dir",
    "train_stream",
]
