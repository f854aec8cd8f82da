"""Weight sharing by per-layer k-means: a ``Clustered`` leaf holds a codebook and packed indices.

Fine-tuning trains the codebooks only: :func:`codebooks` takes them out of a clustered tree as
plain float leaves that any optax transform can train, :func:`with_codebooks` puts them back. The
dense weight is ``codebook[indices]``, so by the chain rule each centroid's gradient is the sum of
the gradients of the weights that share it; the integer indices never change.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxopt_big import _bits
from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["Clustered", "KMeans", "kmeans", "cluster", "codebooks", "with_codebooks"]


def _index_bits(n_clusters: int) -> int:
    return max(1, math.ceil(math.log2(n_clusters)))


@flax.struct.dataclass
class Clustered(_leaves.Compressed):
    """A weight stored as a float codebook and ``ceil(log2 k)``-bit packed indices into it.

    Attributes:
      codebook: ``(k,)`` centroids (trainable).
      packed: ``uint8`` buffer of the packed indices (see :mod:`jaxopt_big._bits`).
      dense_shape: shape of the weight it stands for.
      bits: bits per index.

    Examples:
      >>> import jax.numpy as jnp
      >>> c = Clustered.from_indices(jnp.array([-1.0, 0.5]), jnp.array([[0, 1], [1, 1]]))
      >>> c.dense().tolist(), c.nbytes
      ([[-1.0, 0.5], [0.5, 0.5]], 9)
    """

    codebook: jax.Array
    packed: jax.Array
    dense_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_indices(cls, codebook: jax.Array, indices: jax.Array) -> Clustered:
        """Packs ``indices`` (integers in ``[0, len(codebook))``) next to ``codebook``."""
        bits = _index_bits(codebook.shape[0])
        return cls(codebook=codebook, packed=_bits.pack(indices.reshape(-1), bits), dense_shape=tuple(indices.shape),
                   bits=bits)

    def indices(self) -> jax.Array:
        """The ``int32`` cluster index of every weight, in the weight's shape."""
        packed = _bits.unpack(self.packed, self.bits, math.prod(self.dense_shape))
        return packed.astype(jnp.int32).reshape(self.dense_shape)

    def dense(self) -> jax.Array:
        indices = self.indices()
        # Explicit mesh axes: gather from the whole codebook into the indices' sharding.
        return _leaves.replicated(self.codebook).at[indices].get(out_sharding=jax.typeof(indices).sharding)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.codebook, self.packed))

    @property
    def dense_dtype(self) -> Any:
        return self.codebook.dtype

    @property
    def kind(self) -> str:
        return f"clustered k={self.codebook.shape[0]}"


class KMeans(NamedTuple):
    """Result of :func:`kmeans`: centroids ``(k,)``, an index per value and the objective per step.

    ``objective[t]`` is the sum of squared distances to the assigned centroid after the t-th
    assignment step (``iters + 1`` entries: the k-means++ start, then after each Lloyd update).
    """

    centroids: jax.Array
    assignments: jax.Array
    objective: jax.Array


def _assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    # 1-D nearest centroid in O(n log k): cut the sorted centroids at their midpoints.
    order = jnp.argsort(centroids)
    ordered = centroids[order]
    return order[jnp.searchsorted((ordered[1:] + ordered[:-1]) / 2, x)]


def _kmeans_plus_plus(x: jax.Array, n_clusters: int, key: jax.Array) -> jax.Array:
    """Greedy k-means++ (Arthur & Vassilvitskii): each new centroid is the best of a few D²-samples."""
    trials = 2 + int(math.log(n_clusters))
    first_key, key = jax.random.split(key)
    centroids = jnp.zeros(n_clusters, x.dtype).at[0].set(x[jax.random.randint(first_key, (), 0, x.size)])
    d2 = (x - centroids[0]) ** 2

    def body(i, carry):
        centroids, d2 = carry
        total = d2.sum()
        p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), 1.0 / x.size)
        picks = x[jax.random.choice(jax.random.fold_in(key, i), x.size, (trials,), p=p)]
        candidates = jnp.minimum(d2[None], (x[None] - picks[:, None]) ** 2)
        best = jnp.argmin(candidates.sum(axis=1))
        return centroids.at[i].set(picks[best]), candidates[best]

    return jax.lax.fori_loop(1, n_clusters, body, (centroids, d2))[0]


@functools.partial(jax.jit, static_argnames=("n_clusters", "iters"))
def _kmeans(x: jax.Array, key: jax.Array, n_clusters: int, iters: int) -> KMeans:
    x = _leaves.replicated(x).reshape(-1)  # sampling and sorting need the values whole

    def lloyd(centroids, _):
        a = _assign(x, centroids)
        objective = ((x - centroids[a]) ** 2).sum()
        sums = jax.ops.segment_sum(x, a, n_clusters)
        counts = jax.ops.segment_sum(jnp.ones_like(x), a, n_clusters)
        # An empty cluster keeps its centroid (it moves nothing, so the objective cannot rise).
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centroids), objective

    centroids, history = jax.lax.scan(lloyd, _kmeans_plus_plus(x, n_clusters, key), None, length=iters)
    a = _assign(x, centroids)
    return KMeans(centroids, a, jnp.append(history, ((x - centroids[a]) ** 2).sum()))


def _check_clusters(path: str, n_clusters: Any, x: jax.Array) -> int:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{path}: clustering needs a float kernel, got dtype {x.dtype}")
    n_clusters = _checks.integer(f"{path}: n_clusters", n_clusters, low=2)
    if n_clusters > x.size:
        raise ValueError(f"{path}: n_clusters={n_clusters} is more than the {x.size} weights of the leaf")
    _checks.finite([(path, x)], "values to cluster")
    return n_clusters


def kmeans(x: jax.typing.ArrayLike, n_clusters: int, *, key: jax.Array, iters: int = 20) -> KMeans:
    """1-D k-means of the values of ``x``: k-means++ start from ``key``, then jitted Lloyd steps.

    Args:
      x: values to cluster (any shape; read flattened).
      n_clusters: number of centroids, ``2 <= n_clusters <= x.size``.
      key: PRNG key of the k-means++ start.
      iters: number of Lloyd iterations (static).

    Returns:
      A :class:`KMeans` with the centroids, the flat assignments and the objective history, which
      never increases.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> res = kmeans(jnp.array([0.0, 0.1, 5.0, 5.2]), 2, key=jax.random.key(0))
      >>> sorted(res.centroids.round(2).tolist())
      [0.05, 5.1]
    """
    x = jnp.asarray(x)
    n_clusters = _check_clusters("x", n_clusters, x)
    iters = _checks.integer("iters", iters, low=1)
    return _kmeans(x, key, n_clusters, iters)


def cluster(params: Any, n_clusters: int | Sequence[_tree.Rule], *, key: jax.Array,
            where: _tree.Where = _tree.KERNELS, iters: int = 20) -> Any:
    """Replaces each selected weight by a :class:`Clustered` leaf with its own k-means codebook.

    Args:
      params: parameter pytree.
      n_clusters: clusters per layer, or rules ``[jb.tree.Rule(regex, n_clusters or None), ...]``
        among the selected leaves (first match wins; unclaimed leaves stay dense).
      key: PRNG key; each layer uses ``fold_in(key, crc32(path))``, so results do not depend on
        which other layers are selected.
      where: which leaves to cluster (default: kernels).
      iters: Lloyd iterations per layer.

    Returns:
      ``params`` with the selected leaves replaced by :class:`Clustered`.

    Raises:
      ValueError: naming the leaf path and value, for ``n_clusters < 2`` or more clusters than
        the leaf has weights; ``iters < 1``.
      TypeError: a selected leaf that is not float (naming it); a bool or non-int ``iters``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)), "bias": jnp.zeros(8)}}
      >>> c = cluster(p, 4, key=jax.random.key(1))
      >>> k = c["Dense_0"]["kernel"]
      >>> k.kind, k.nbytes, len(set(k.dense().ravel().tolist()))
      ('clustered k=4', 48, 4)
    """
    iters = _checks.integer("iters", iters, low=1)

    def leaf(path: str, w: Any, k: Any) -> Any:
        x = jnp.asarray(w)
        k = _check_clusters(path, k, x)
        res = _kmeans(x, jax.random.fold_in(key, zlib.crc32(path.encode())), k, iters)
        clustered = Clustered.from_indices(res.centroids.astype(w.dtype), res.assignments.reshape(w.shape))
        return _leaves.place_like(clustered, w)

    return _tree.map_float_kernels(leaf, params, n_clusters, where, purpose="to cluster", what="n_clusters")


def _is_clustered(x: Any) -> bool:
    return isinstance(x, Clustered)


def codebooks(tree: Any) -> Any:
    """The trainable part of a clustered tree: each :class:`Clustered` leaf replaced by its codebook.

    Other leaves (biases, unclustered weights) stay as they are, so the result is the tree to
    train with optax; rebuild the model's parameters with :func:`with_codebooks`.

    Examples:
      >>> import jax.numpy as jnp
      >>> t = {"k": Clustered.from_indices(jnp.array([1.0, 2.0]), jnp.array([0, 1, 1])), "b": jnp.zeros(2)}
      >>> codebooks(t)["k"].tolist()
      [1.0, 2.0]
    """
    return jax.tree.map(lambda x: x.codebook if _is_clustered(x) else x, tree, is_leaf=_leaves.is_compressed)


def with_codebooks(tree: Any, trained: Any) -> Any:
    """Puts trained codebooks (from :func:`codebooks`) back into the clustered ``tree``.

    Examples:
      >>> import jax.numpy as jnp
      >>> t = {"k": Clustered.from_indices(jnp.array([1.0, 2.0]), jnp.array([0, 1, 1]))}
      >>> with_codebooks(t, {"k": jnp.array([5.0, 6.0])})["k"].dense().tolist()
      [5.0, 6.0, 6.0]
    """
    return jax.tree.map(lambda x, t: x.replace(codebook=t) if _is_clustered(x) else t, tree, trained,
                        is_leaf=_leaves.is_compressed)
