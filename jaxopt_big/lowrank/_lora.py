"""LoRA adapters (Hu et al. 2021) as compressed leaves: ``W + (alpha / r) · A B`` with ``W`` frozen.

A ``LoRA`` leaf replaces a kernel in the parameter tree and holds the frozen ``base`` (a dense array,
or any compressed leaf such as a ``QArray`` for QLoRA), the trainable ``a`` (``(..., r)``, the
kernel's input axes then rank) and ``b`` (``(r, n)``), and the static ``scale = alpha / r``. Its
``dense()`` is the merged kernel, so everything that densifies sees the adapted model, and
a layer runs it as ``x @ W + scale · (x @ A) @ B`` without merging (its execution hook, see
:mod:`jaxopt_big.leaves`).
"""

from __future__ import annotations

import zlib
from typing import Any
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["LoRA", "lora_init", "lora_labels", "lora_trainable", "lora_partition", "lora_combine",
           "lora_merge", "lora_unmerge"]

TRAIN, FROZEN = "lora", "frozen"


def _dense(x: Any) -> jax.Array:
    return x.dense() if _leaves.is_compressed(x) else jnp.asarray(x)


@flax.struct.dataclass
class LoRA(_leaves.Compressed):
    """A frozen kernel plus a trainable low-rank update; ``dense() == base + scale * tensordot(a, b, 1)``.

    Attributes:
      base: the frozen kernel (array or compressed leaf, e.g. ``QArray``).
      a: ``(..., r)`` down-projection, random at init.
      b: ``(r, n)`` up-projection, zero at init (so the adapted model starts equal to the base).
      scale: ``alpha / r`` (static).

    Examples:
      >>> import jax.numpy as jnp
      >>> leaf = LoRA(base=jnp.zeros((4, 3)), a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), scale=0.5)
      >>> leaf.dense()[0].tolist(), leaf.kind, leaf.nbytes
      ([1.0, 1.0, 1.0], 'lora r=2', 104)
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = flax.struct.field(pytree_node=False)

    @property
    def rank(self) -> int:
        return self.b.shape[0]

    def delta(self, dtype: Any = None) -> jax.Array:
        """``scale * tensordot(a, b, 1)`` in ``dtype`` (the base's by default)."""
        return (self.scale * jnp.tensordot(self.a, self.b, axes=1)).astype(dtype or self.dtype)

    def dense(self) -> jax.Array:
        base = _dense(self.base)
        return base + self.delta(base.dtype)

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (*self.a.shape[:-1], self.b.shape[-1])

    @property
    def dense_dtype(self) -> Any:
        return self.a.dtype if self.base is None else self.base.dtype

    def contract(self, x: jax.Array, c: _leaves.Contraction) -> jax.Array:
        """``x @ W + scale * (x @ a) @ b`` without merging; the base runs on its own hook (e.g. ``QArray``)."""
        return _leaves.contract(self.base, x, c) + self.scale * (c(x, self.a) @ self.b)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.base, self.a, self.b))

    @property
    def kind(self) -> str:
        inner = getattr(self.base, "kind", "dense")
        return f"lora r={self.rank}" + ("" if inner == "dense" else f" + {inner}")

    def flops(self) -> int:
        """Base FLOPs (dense ``2 m n`` unless the base says otherwise) plus ``2 r (m + n)``."""
        base = self.base.flops() if _leaves.is_compressed(self.base) else None
        m = int(np.prod(self.a.shape[:-1]))
        return (2 * m * self.b.shape[-1] if base is None else base) + 2 * self.rank * (m + self.b.shape[-1])


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoRA)


def lora_init(params: Any, key: jax.Array, *, rank: int | Sequence[_tree.Rule[int]],
              alpha: float | Sequence[_tree.Rule[float]], where: _tree.Where = _tree.KERNELS) -> Any:
    """Wraps the selected kernels in ``LoRA`` leaves: ``a`` uniform(±1/sqrt(fan_in)), ``b`` zero.

    Args:
      params: a parameter pytree; selected kernels may be dense or compressed (``QArray``: QLoRA).
      key: PRNG key; each leaf uses ``fold_in(key, crc32(path))``.
      rank: adapter rank, ``1 <= rank <= min(m, n)`` of each kernel seen as ``(prod(shape[:-1]), n)``;
        or rules ``[jb.tree.Rule(regex, rank or None), ...]`` among the selected leaves (first match
        wins; unclaimed leaves get no adapter; see :mod:`jaxopt_big.tree`).
      alpha: scaling numerator; the update is ``(alpha / rank) * a @ b``. A value or rules (a leaf
        with a rank needs an alpha).
      where: the candidate leaves (default: kernels with ndim >= 2).

    Returns:
      The tree with ``LoRA`` leaves; the adapted model equals the original at init.

    Raises:
      ValueError: a bad rank (naming the leaf path and value), a 1-D leaf selected, nothing selected.
      TypeError: a selected kernel that is not floating point (its dense dtype, for a compressed
        leaf), naming the leaf path.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
      >>> lora = lora_init(params, jax.random.key(0), rank=2, alpha=4.0)
      >>> k = lora["Dense_0"]["kernel"]
      >>> k.a.shape, k.b.shape, k.scale, bool((k.dense() == 1).all())
      ((8, 2), (2, 4), 2.0, True)
    """
    alphas = {p: a for p, _, a in _tree.assigned(params, alpha, where=where, what="alpha")}

    def one(path: str, w: Any, rank: Any) -> LoRA:
        rank = _checks.integer(f"{path}: rank", rank, low=1)
        if path not in alphas:
            raise ValueError(f"{path}: has a LoRA rank but no alpha; alpha rules claim {sorted(alphas)}")
        alpha = _checks.number(f"{path}: alpha", alphas[path])
        shape = tuple(w.shape)
        if len(shape) < 2:
            raise ValueError(f"{path}: LoRA needs a kernel with ndim >= 2, got shape {shape}")
        if not jnp.issubdtype(w.dtype, jnp.floating):  # the merged update would be cast to it (rounded away)
            raise TypeError(f"{path}: LoRA adapts float kernels, got dtype {np.dtype(w.dtype).name}")
        m, n = int(np.prod(shape[:-1])), shape[-1]
        if rank > min(m, n):
            raise ValueError(f"{path}: rank={rank} exceeds min(m, n)={min(m, n)} of the {m}x{n} kernel")
        dtype = w.dtype
        bound = 1.0 / np.sqrt(m)
        a = jax.random.uniform(jax.random.fold_in(key, zlib.crc32(path.encode())), (*shape[:-1], rank), dtype,
                               -bound, bound)
        a, b = _leaves.place_factors(a, jnp.zeros((rank, n), dtype), w)
        return LoRA(base=w, a=a, b=b, scale=float(alpha) / rank)

    return _tree.map_assigned(one, params, rank, where=where, what="rank")


def lora_labels(params: Any) -> Any:
    """The optax label tree: ``"lora"`` for adapter factors, ``"frozen"`` for everything else.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = lora_init({"d": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=1, alpha=1.0)
      >>> labels = lora_labels(p)["d"]["kernel"]
      >>> labels.base, labels.a, labels.b
      ('frozen', 'lora', 'lora')
    """
    def label(x):
        if _is_lora(x):
            return x.replace(base=jax.tree.map(lambda _: FROZEN, x.base), a=TRAIN, b=TRAIN)
        return jax.tree.map(lambda _: FROZEN, x)
    return jax.tree.map(label, params, is_leaf=_is_lora)


def lora_trainable(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the adapter factors only; everything else gets zero updates and no optimizer state.

    Built with ``optax.multi_transform`` and :func:`lora_labels`. A zero update leaves a frozen
    weight bitwise unchanged (``w + 0 == w``). For integer bases (QLoRA), whose gradients JAX does
    not take, train the adapters alone with :func:`lora_partition` / :func:`lora_combine`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> p = lora_init({"d": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=1, alpha=1.0)
      >>> tx = lora_trainable(optax.adam(1e-3))
      >>> state = tx.init(p)
      >>> sum(x.size for x in jax.tree.leaves(state))  # adam mu + nu of a (4x1) and b (1x4), + count
      17
    """
    return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, lora_labels)


def lora_partition(params: Any) -> tuple[Any, Any]:
    """Splits a tree into ``(adapters, frozen)``: each holds ``None`` where the other holds a leaf.

    Differentiate and optimize ``adapters`` only; :func:`lora_combine` rebuilds the full tree.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = lora_init({"d": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}, jax.random.key(0),
      ...               rank=1, alpha=1.0)
      >>> adapters, frozen = lora_partition(p)
      >>> [x.shape for x in jax.tree.leaves(adapters)], [x.shape for x in jax.tree.leaves(frozen)]
      ([(4, 1), (1, 4)], [(4,), (4, 4)])
    """
    labels = lora_labels(params)
    pick = lambda want: jax.tree.map(lambda x, label: x if label == want else None, params, labels)
    return pick(TRAIN), pick(FROZEN)


def lora_combine(adapters: Any, frozen: Any) -> Any:
    """Inverse of :func:`lora_partition`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = lora_init({"d": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=1, alpha=1.0)
      >>> jax.tree.structure(lora_combine(*lora_partition(p))) == jax.tree.structure(p)
      True
    """
    return jax.tree.map(lambda a, f: f if a is None else a, adapters, frozen, is_leaf=lambda x: x is None)


def lora_merge(params: Any) -> Any:
    """Replaces every ``LoRA`` leaf by its merged dense kernel ``base + scale * a @ b``.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"k": LoRA(base=jnp.ones((2, 2)), a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=1.0)}
      >>> lora_merge(p)["k"].tolist()
      [[2.0, 2.0], [2.0, 2.0]]
    """
    return jax.tree.map(lambda x: x.dense() if _is_lora(x) else x, params, is_leaf=_is_lora)


def lora_unmerge(merged: Any, adapters: Any) -> Any:
    """Subtracts the adapters back out of merged kernels: ``LoRA(merged - scale * a @ b, a, b)``.

    Args:
      merged: the output of :func:`lora_merge` (or the same tree after, e.g., saving and loading).
      adapters: a tree of the same structure whose ``LoRA`` leaves give ``a``, ``b``, ``scale`` (their
        ``base`` is ignored and may be ``None``, as in the first output of :func:`lora_partition`).

    Returns:
      ``merged`` with ``LoRA`` leaves again. The subtraction uses the very ``delta`` the merge added,
      so the base comes back bitwise or within the rounding of the merge (1 ulp of the merged value).

    Raises:
      ValueError: a merged kernel whose shape differs from its adapter's, naming the path.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = {"k": LoRA(base=jnp.full((2, 2), 0.5), a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=1.0)}
      >>> back = lora_unmerge(lora_merge(p), p)
      >>> back["k"].base.tolist()
      [[0.5, 0.5], [0.5, 0.5]]
    """
    def one(keypath, adapter, w):
        if not _is_lora(adapter):
            return w
        if tuple(np.shape(w)) != adapter.shape:
            raise ValueError(f"{_tree.path_str(keypath)}: merged kernel has shape {tuple(np.shape(w))}, "
                             f"its adapter expects {adapter.shape}")
        return adapter.replace(base=w - adapter.delta(w.dtype))

    return jax.tree_util.tree_map_with_path(one, adapters, merged, is_leaf=lambda x: x is None or _is_lora(x))
