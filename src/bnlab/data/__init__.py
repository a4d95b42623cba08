"""bnlab.data: verified MNIST and Fashion-MNIST as tensors (lab layer)."""

from bnlab.data.datasets import (DATASETS, Dataset, DatasetSpec, DataUnavailableError, default_data_dir, fetch_dataset,
                                 load_dataset)
from bnlab.data.idx import IdxError, read_idx, write_idx

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "DataUnavailableError",
    "default_data_dir",
    "load_dataset",
    "fetch_dataset",
    "IdxError",
    "read_idx",
    "write_idx",
]
