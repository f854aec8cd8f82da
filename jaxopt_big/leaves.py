"""The compressed-leaf protocol.

A compressed leaf (``QArray``, ``LowRank``, ``PackedSparse``, ``Clustered``) is a pytree node that
stands in for one dense array. It knows its dense value (``.dense()``), the bytes it really occupies
(``.nbytes``) and how the report should describe it (``.describe()``). Tree code in the library treats
such an object as *one* leaf, never as the arrays inside it.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["Compressed", "Description", "is_compressed", "densify", "nbytes", "leaf_nbytes", "map", "leaves_with_path"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Description:
    """What the report says about one leaf.

    Attributes:
      kind: short name of the storage ("dense", "int8", "lowrank r=16", "sparse 2:4", ...).
      shape: shape of the dense array the leaf stands for.
      dtype: dtype of that dense array.
      bits: stored bits per represented weight, everything included (scales, indices, masks).
      nonzero: fraction of nonzero weights in the dense value, when the leaf knows it cheaply.
      flops: floating-point operations to multiply one input row by this kernel, when it differs
        from the dense ``2 * size`` (for example ``2 * r * (m + n)`` for a rank-r factorization).
    """

    kind: str
    shape: tuple[int, ...]
    dtype: Any
    bits: float
    nonzero: float | None = None
    flops: int | None = None


class Compressed(abc.ABC):
    """Base class of compressed leaves: a stand-in for one dense array.

    Subclasses are ``flax.struct`` dataclasses (so they flatten, jit and checkpoint) and implement
    ``dense``, ``nbytes`` and ``kind``. ``shape``/``dtype`` are those of the dense value; by default
    they read static ``dense_shape``/``dense_dtype`` fields.
    """

    # Declared for the default ``shape``/``dtype``; each subclass defines them as static fields.
    dense_shape: tuple[int, ...]
    dense_dtype: Any

    @abc.abstractmethod
    def dense(self) -> jax.Array:
        """The dense array this leaf stands for."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes really stored, all parts included."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense value: the ``dense_shape`` field unless a subclass says otherwise."""
        return tuple(self.dense_shape)

    @property
    def dtype(self) -> Any:
        """Dtype of the dense value: the ``dense_dtype`` field unless a subclass says otherwise."""
        return self.dense_dtype

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """Short storage name for the report."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def nonzero_fraction(self) -> float | None:
        """Fraction of nonzeros of the dense value if cheaply known, else None."""
        return None

    def flops(self) -> int | None:
        """FLOPs of one input row through this kernel, if not the dense count; else None."""
        return None

    def describe(self) -> Description:
        return Description(kind=self.kind, shape=tuple(self.shape), dtype=self.dtype,
                           bits=8 * self.nbytes / max(self.size, 1), nonzero=self.nonzero_fraction(),
                           flops=self.flops())


def is_compressed(x: Any) -> bool:
    """True for compressed leaves.

    Examples:
      >>> import jax.numpy as jnp
      >>> is_compressed(jnp.zeros(3))
      False
    """
    return isinstance(x, Compressed)


def map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:  # noqa: A001 - mirrors jax.tree.map
    """``jax.tree.map`` that hands compressed leaves to ``fn`` whole.

    Examples:
      >>> import jax.numpy as jnp
      >>> map(lambda x: x.shape, {"a": jnp.zeros((2, 3))})
      {'a': (2, 3)}
    """
    return jax.tree.map(fn, tree, *rest, is_leaf=is_compressed)


def leaves_with_path(tree: Any) -> list[tuple[Any, Any]]:
    """``jax.tree_util.tree_leaves_with_path`` with compressed leaves kept whole."""
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_compressed)


def densify(tree: Any) -> Any:
    """Replaces every compressed leaf by its dense value.

    Examples:
      >>> import jax.numpy as jnp
      >>> densify({"w": jnp.ones(2)})["w"].tolist()
      [1.0, 1.0]
    """
    return map(lambda x: x.dense() if is_compressed(x) else x, tree)


def leaf_nbytes(x: Any) -> int:
    """True bytes of one leaf (compressed or array-like, including tracers and shape-dtype structs)."""
    if is_compressed(x):
        return int(x.nbytes)
    if hasattr(x, "nbytes"):
        return int(x.nbytes)
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # jax.ShapeDtypeStruct
        return math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return int(np.asarray(x).nbytes)


def nbytes(tree: Any) -> int:
    """Total true bytes of a tree; compressed leaves count what they really store.

    Examples:
      >>> import jax.numpy as jnp
      >>> nbytes({"a": jnp.zeros((4, 4)), "b": jnp.zeros(2, jnp.int8)})
      66
    """
    return sum(leaf_nbytes(x) for x in jax.tree.leaves(tree, is_leaf=is_compressed))
