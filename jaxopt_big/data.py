"""Embedded datasets and batching.

The default dataset is scikit-learn's digits (1797 8×8 images, 10 classes), which ships inside the
scikit-learn wheel: nothing is downloaded.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import jax
import numpy as np

__all__ = ["Dataset", "digits", "holdout_split", "batches"]


class Dataset(NamedTuple):
    """Inputs and integer labels, as numpy arrays (host memory until batched)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx) -> "Dataset":
        return Dataset(self.x[idx], self.y[idx])


def digits(*, flat: bool = False) -> Dataset:
    """scikit-learn digits scaled to [0, 1]: images ``(1797, 8, 8, 1)`` or flat ``(1797, 64)``.

    Examples:
      >>> ds = digits()
      >>> ds.x.shape, ds.y.shape, float(ds.x.max())
      ((1797, 8, 8, 1), (1797,), 1.0)
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images / 16.0).astype(np.float32)
    x = x.reshape(len(x), -1) if flat else x[..., None]
    return Dataset(x, raw.target.astype(np.int32))


def holdout_split(ds: Dataset, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Stratified, seeded split into (train, test): each class keeps its share in both parts.

    Examples:
      >>> train, test = holdout_split(digits(), test_fraction=0.25)
      >>> len(train) + len(test), abs(len(test) - 0.25 * 1797) < 10
      (1797, True)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(ds.y):
        members = rng.permutation(np.flatnonzero(ds.y == c))
        test_idx.append(members[: int(round(test_fraction * len(members)))])
    test_mask = np.zeros(len(ds), bool)
    test_mask[np.concatenate(test_idx)] = True
    return ds.take(np.flatnonzero(~test_mask)), ds.take(np.flatnonzero(test_mask))


def batches(ds: Dataset, batch_size: int, *, key: jax.Array | None = None,
            drop_remainder: bool = False) -> Iterator[Dataset]:
    """Yields batches; shuffled by ``key`` (explicit PRNG), in order when ``key`` is None.

    Examples:
      >>> ds = Dataset(np.arange(10), np.arange(10))
      >>> [len(b) for b in batches(ds, 4)]
      [4, 4, 2]
      >>> [len(b) for b in batches(ds, 4, key=jax.random.key(0), drop_remainder=True)]
      [4, 4]
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(ds)
    order = np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        yield ds.take(order[start:start + batch_size])
