"""Truncated SVD of kernels into ``LowRank(u, v)`` leaves: by rank, kept spectral energy or budget.

A kernel of shape ``(..., n)`` (Dense ``(m, n)``, Conv HWIO ``(H, W, I, O)``) is factorized as the
matrix ``(prod(...), n)``; ``u`` keeps the leading axes, so ``tensordot(u, v, 1)`` is the kernel.
The singular values are split evenly, ``u = U sqrt(s)`` and ``v = sqrt(s) Vᵀ``, so both factors
have the same scale and train well together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["LowRank", "Factorization", "factorize", "factorize_params"]


@flax.struct.dataclass
class LowRank(_leaves.Compressed):
    """A kernel stored as two factors; ``dense() == tensordot(u, v, 1)``; a layer runs it as ``x @ u @ v``.

    Attributes:
      u: ``(..., r)``: the kernel's input axes (``(m,)`` for Dense, ``(H, W, I)`` for Conv) then rank.
      v: ``(r, n)``: rank then output features.

    Examples:
      >>> import jax.numpy as jnp
      >>> lr = LowRank(u=jnp.ones((6, 2)), v=jnp.ones((2, 4)))
      >>> lr.shape, lr.rank, lr.nbytes, lr.flops()
      ((6, 4), 2, 80, 40)
    """

    u: jax.Array
    v: jax.Array

    def dense(self) -> jax.Array:
        return jnp.tensordot(self.u, self.v, axes=1)

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (*self.u.shape[:-1], self.v.shape[-1])

    @property
    def dense_dtype(self) -> Any:
        return jnp.result_type(self.u, self.v)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.u, self.v))

    @property
    def kind(self) -> str:
        return f"lowrank r={self.rank}"

    def flops(self) -> int:
        """FLOPs of one input row through ``(x @ u) @ v``: ``2 r (m + n)``."""
        return 2 * self.rank * (math.prod(self.u.shape[:-1]) + self.v.shape[-1])

    def contract(self, x: jax.Array, c: _leaves.Contraction) -> jax.Array:
        """The layer's contraction with ``u`` (to ``r`` features), then ``v``: the kernel is never built."""
        return c(x, self.u) @ self.v


@dataclasses.dataclass(frozen=True, kw_only=True)
class Factorization:
    """How to choose the rank of one kernel; exactly one of ``rank``, ``energy``, ``max_params``.

    Attributes:
      rank: keep this many singular values.
      energy: keep the smallest rank whose singular values hold at least this fraction of
        ``sum(s**2)``; in (0, 1]. Needs the full spectrum, so not with ``randomized``.
      max_params: the largest rank with ``r * (m + n) <= max_params``.
      randomized: Halko et al. randomized SVD instead of the full one (needs a ``key``).
      oversample: extra sketch columns of the randomized SVD.
      power_iters: power iterations of the randomized SVD (each re-orthonormalised by QR).

    Examples:
      >>> Factorization(rank=4)
      Factorization(rank=4, energy=None, max_params=None, randomized=False, oversample=10, power_iters=2)
      >>> Factorization(energy=1.5)
      Traceback (most recent call last):
      ...
      ValueError: energy must be in (0, 1], got 1.5
    """

    rank: int | None = None
    energy: float | None = None
    max_params: int | None = None
    randomized: bool = False
    oversample: int = 10
    power_iters: int = 2

    def __post_init__(self):
        given = [k for k in ("rank", "energy", "max_params") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, energy, max_params; got {given or 'none'}")
        _checks.store(self, randomized=_checks.flag("randomized", self.randomized))
        for name, low in (("rank", 1), ("max_params", 1), ("oversample", 0), ("power_iters", 0)):
            if getattr(self, name) is not None:
                _checks.store(self, **{name: _checks.integer(name, getattr(self, name), low=low)})
        if self.energy is not None:
            _checks.store(self, energy=_checks.fraction("energy", self.energy, closed=True, open_low=True))
        if self.randomized and self.energy is not None:
            raise ValueError("energy= needs the full spectrum; use rank= or max_params= with randomized=True")


def _as_kernel(path: str, w: Any) -> jax.Array:
    w = jnp.asarray(w.dense() if _leaves.is_compressed(w) else w)
    if w.ndim < 2:
        raise ValueError(f"{path}: only kernels with ndim >= 2 can be factorized, got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"{path}: cannot factorize a zero-size kernel (shape {w.shape})")
    return w if jnp.issubdtype(w.dtype, jnp.floating) else w.astype(jnp.float32)


def _budget_rank(path: str, how: Factorization, m: int, n: int) -> int | None:
    """The rank fixed by ``rank``/``max_params`` (None for ``energy``), validated against the shape."""
    if how.rank is not None:
        if how.rank > min(m, n):
            raise ValueError(f"{path}: rank={how.rank} exceeds min(m, n)={min(m, n)} of the {m}x{n} matrix")
        return how.rank
    if how.max_params is not None:
        rank = min(how.max_params // (m + n), min(m, n))
        if rank == 0:
            raise ValueError(f"{path}: max_params={how.max_params} allows no rank of a {m}x{n} matrix "
                             f"(rank 1 needs {m + n})")
        return rank
    return None


def _energy_rank(path: str, s: jax.Array, energy: float) -> int:
    try:
        s2 = np.asarray(s, np.float64) ** 2
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"{path}: energy={energy} picks the rank from the values; call outside jit") from None
    if not s2.sum():  # an all-zero kernel: rank 1 already keeps all of its (zero) energy
        return 1
    kept = np.cumsum(s2) / s2.sum()
    kept[-1] = 1.0  # the whole spectrum keeps all energy, whatever the rounding
    return int(np.searchsorted(kept, energy) + 1)


def _orthonormal(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


def _randomized_svd(w: jax.Array, rank: int, key: jax.Array, oversample: int, power_iters: int):
    """Halko, Martinsson & Tropp (2011), algorithms 4.4 + 5.1: a QR-stabilised power-iterated sketch."""
    k = min(rank + oversample, *w.shape)
    q = _orthonormal(w @ jax.random.normal(key, (w.shape[1], k), w.dtype))
    for _ in range(power_iters):
        q = _orthonormal(w @ _orthonormal(w.T @ q))
    ub, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ ub, s, vt


def _factorize(path: str, w: Any, how: Factorization, key: jax.Array | None) -> LowRank:
    w = _as_kernel(path, w)
    m, n = math.prod(w.shape[:-1]), w.shape[-1]
    rank = _budget_rank(path, how, m, n)
    if how.randomized and key is None:
        raise ValueError(f"{path}: randomized=True needs an explicit PRNG key")
    if rank is not None:
        lr, bad = _factorized(w, key, rank, how)
        _checks.nonfinite_count(path, bad, w.size, "values to factorize")
    else:  # the rank depends on the spectrum: pick it on the host between two programs
        assert how.energy is not None  # Factorization holds exactly one of rank, energy, max_params
        u, s, vt, bad = _spectrum(w, key, None, how)
        _checks.nonfinite_count(path, bad, w.size, "values to factorize")
        lr = _truncate(u, s, vt, bad, _energy_rank(path, s, how.energy), w.shape, w.dtype)
    return LowRank(*_leaves.place_factors(lr.u, lr.v, w))


# Eagerly, op-by-op dispatch compiled each of ~17 ops on its own for every new kernel shape; these
# compile one program per shape (two for energy=), the NaN/Inf count included.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _spectrum(w: jax.Array, key: jax.Array | None, rank: int | None, how: Factorization):
    """SVD of ``w`` as a matrix, in >= float32, and its count of NaN/Inf (then the SVD of zeros)."""
    work = _leaves.replicated(w).reshape(-1, w.shape[-1]).astype(jnp.promote_types(w.dtype, jnp.float32))
    # Traced NaN/Inf (concrete ones raise after it): factorize zeros, then give NaN factors, not SVD noise.
    bad = jnp.sum(~jnp.isfinite(work))
    work = jnp.where(bad > 0, 0.0, work)
    if how.randomized:
        assert rank is not None and key is not None  # Factorization rejects energy= with randomized=True
        return (*_randomized_svd(work, rank, key, how.oversample, how.power_iters), bad)
    return (*jnp.linalg.svd(work, full_matrices=False), bad)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _truncate(u, s, vt, bad, rank: int, shape: tuple[int, ...], dtype) -> LowRank:
    root = jnp.sqrt(s[:rank])
    u = jnp.where(bad > 0, jnp.nan, u[:, :rank] * root).astype(dtype).reshape(*shape[:-1], rank)
    return LowRank(u=u, v=jnp.where(bad > 0, jnp.nan, root[:, None] * vt[:rank]).astype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _factorized(w: jax.Array, key: jax.Array | None, rank: int, how: Factorization) -> tuple[LowRank, jax.Array]:
    u, s, vt, bad = _spectrum(w, key, rank, how)
    return _truncate(u, s, vt, bad, rank, w.shape, w.dtype), bad


def factorize(w: jax.typing.ArrayLike, *, rank: int | None = None, energy: float | None = None,
              max_params: int | None = None, randomized: bool = False, key: jax.Array | None = None,
              oversample: int = 10, power_iters: int = 2) -> LowRank:
    """Truncated SVD of one kernel into ``LowRank(u, v)``, optimal in Frobenius norm (Eckart–Young).

    Args:
      w: a kernel with ``ndim >= 2``; axes before the last are flattened into rows (Conv HWIO too).
      rank: keep this many singular values (1 <= rank <= min(m, n)).
      energy: keep the smallest rank holding at least this fraction of ``sum(s**2)``, in (0, 1].
      max_params: the largest rank with ``rank * (m + n) <= max_params``.
      randomized: use a randomized SVD (Halko et al.) — much faster for rank << min(m, n).
      key: PRNG key of the randomized sketch (required when ``randomized``).
      oversample: extra sketch columns of the randomized SVD.
      power_iters: power iterations of the randomized SVD.

    Returns:
      ``LowRank`` with ``u`` of shape ``(*w.shape[:-1], r)`` and ``v`` of shape ``(r, w.shape[-1])``,
      in ``w``'s dtype.

    Raises:
      ValueError: not exactly one of rank/energy/max_params, a rank outside [1, min(m, n)], energy
        outside (0, 1], a budget too small for rank 1, a 1-D array, randomized without a key, NaN
        or Inf in a concrete ``w`` (under ``jit`` such a ``w`` gives all-NaN factors instead).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (8, 6))
      >>> lr = factorize(w, rank=6)
      >>> lr.u.shape, lr.v.shape, bool(jnp.allclose(lr.dense(), w, atol=1e-5))
      ((8, 6), (6, 6), True)
      >>> factorize(w, energy=1.0).rank
      6
    """
    how = Factorization(rank=rank, energy=energy, max_params=max_params, randomized=randomized,
                        oversample=oversample, power_iters=power_iters)
    return _factorize("<array>", w, how, key)


_CHOICES = {"rank", "energy", "max_params"}


def _options(path: str, options: dict[str, Any]) -> Factorization:
    try:
        return Factorization(**options)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{path}: {e}") from None


def factorize_params(params: Any, rules: Sequence[_tree.Rule[dict[str, Any] | None]] | None = None, *,
                     where: _tree.Where = _tree.KERNELS, key: jax.Array | None = None, **how: Any) -> Any:
    """Replaces the selected kernels of a tree by ``LowRank`` factorizations.

    Args:
      params: a parameter pytree (linen params, ``nnx.State``...).
      rules: optional ``[jb.tree.Rule(regex, options), ...]`` assigned among the leaves ``where``
        selects (first match wins; see :mod:`jaxopt_big.tree`); ``options`` is a dict of
        :func:`factorize` keywords over ``how`` (a rule naming rank, energy or max_params replaces
        ``how``'s choice), or ``None`` to keep the leaf dense. Selected leaves no rule claims stay
        dense. Without rules every selected leaf is factorized with ``how``.
      where: the candidate leaves (see :func:`jaxopt_big.tree.select`); default: kernels.
      key: PRNG key for ``randomized``; each leaf uses ``fold_in(key, crc32(path))``.
      **how: :func:`factorize` keywords (``rank``, ``energy``, ``max_params``, ``randomized``...).

    Returns:
      The tree with ``LowRank`` leaves in place of the selected kernels.

    Raises:
      ValueError: as :func:`factorize`, naming the leaf path; a rule or ``where`` matching nothing.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt_big.tree import Rule
      >>> params = {"Dense_0": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
      ...           "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
      >>> out = factorize_params(params, [Rule("Dense_0", {"rank": 1}), Rule("Dense_1", None)])
      >>> out["Dense_0"]["kernel"].kind, out["Dense_1"]["kernel"].shape
      ('lowrank r=1', (8, 2))
      >>> factorize_params(params, where=".*/bias", rank=1)
      Traceback (most recent call last):
      ...
      ValueError: Dense_0/bias: only kernels with ndim >= 2 can be factorized, got shape (8,)
    """
    def one(path, w, options):
        if not isinstance(options, dict):
            raise TypeError(f"{path}: factorize options must be a dict of factorize keywords or None, got {options!r}")
        leaf_key = None if key is None else jax.random.fold_in(key, zlib.crc32(path.encode()))
        if _CHOICES & options.keys():  # a rule's rank choice replaces the default one
            options = {**{k: v for k, v in how.items() if k not in _CHOICES}, **options}
        else:
            options = {**how, **options}
        return _factorize(path, w, _options(path, options), leaf_key)

    return _tree.map_float_kernels(one, params, {} if rules is None else rules, where, purpose="to factorize",
                                   what="rules")
