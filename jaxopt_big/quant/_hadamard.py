"""Hadamard matrices and the fast Walsh-Hadamard transform, for QuaRot-style rotations.

A normalized Hadamard matrix ``H`` (entries ``±1/sqrt(n)``, ``H @ H.T = I``) spreads every input
channel evenly over all outputs, so a rotation by ``H`` turns a few outlier channels into many
ordinary ones (Ashkboos et al., 2024). Sizes are ``n = 2^k * m`` with ``m`` 1, or the order of a
Paley matrix (``m = p + 1`` for a prime ``p ≡ 3 mod 4``, ``m = 2 (p + 1)`` for a prime ``p ≡ 1 mod 4``):
that covers the widths of common decoders (e.g. 4096, 14336 = 512 * 28, 8960 = 64 * 140,
18944 = 128 * 148). ``H = S_{2^k} ⊗ P_m / sqrt(n)`` with ``S`` Sylvester's matrix, so
:func:`hadamard_transform` runs the ``2^k`` part as ``k`` butterfly passes (O(n log n)) and the
small ``m`` part as a dense matmul. Other sizes raise ``ValueError``; any orthogonal matrix
(``jax.random.orthogonal``) can rotate a residual stream instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import _checks

__all__ = ["hadamard", "hadamard_transform", "random_hadamard", "hadamard_supported"]


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _jacobsthal(p: int) -> np.ndarray:
    """``Q[i, j] = legendre(j - i, p)`` over the integers mod the prime ``p``."""
    squares = {(i * i) % p for i in range(1, p)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, p)])
    idx = np.arange(p)
    return chi[(idx[None, :] - idx[:, None]) % p]


def _paley(m: int) -> np.ndarray | None:
    """An unnormalized ±1 Hadamard matrix of order ``m`` by Paley's constructions, or None."""
    if m == 1:
        return np.ones((1, 1), np.int64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I: I + [[0, 1], [-1, Q]] with Q antisymmetric
        q = _jacobsthal(m - 1)
        core = np.block([[np.zeros((1, 1), np.int64), np.ones((1, m - 1), np.int64)],
                         [-np.ones((m - 1, 1), np.int64), q]])
        return core + np.eye(m, dtype=np.int64)
    p = m // 2 - 1
    if m % 2 == 0 and _is_prime(p) and p % 4 == 1:  # Paley II from the symmetric conference matrix
        q = _jacobsthal(p)
        conference = np.block([[np.zeros((1, 1), np.int64), np.ones((1, p), np.int64)],
                               [np.ones((p, 1), np.int64), q]])
        return (np.kron(conference, np.array([[1, 1], [1, -1]]))
                + np.kron(np.eye(p + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])))
    return None


@functools.cache
def _factor(n: int) -> tuple[int, np.ndarray] | None:
    """``(2^k, P_m)`` with ``n = 2^k * m`` and the smallest ``m`` that has a Paley matrix, or None."""
    power = n & -n  # the largest power of two dividing n, then smaller ones: the small dense part first
    while power:
        if (p := _paley(n // power)) is not None:
            return power, p
        power //= 2
    return None


def hadamard_supported(n: int) -> bool:
    """Whether :func:`hadamard` builds a matrix of order ``n``.

    Examples:
      >>> hadamard_supported(4096), hadamard_supported(14336), hadamard_supported(172)
      (True, True, False)
    """
    return _factor(_checks.integer("hadamard size", n, low=1)) is not None


def _checked_factor(n: int, name: str) -> tuple[int, np.ndarray]:
    factor = _factor(_checks.integer(name, n, low=1))
    if factor is None:
        raise ValueError(f"{name}: no Hadamard matrix of order {n} is built here (supported: 2^k * m with "
                         "m = 1, p + 1 for a prime p ≡ 3 mod 4, or 2 (p + 1) for a prime p ≡ 1 mod 4)")
    return factor


def hadamard(n: int, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """The normalized Hadamard matrix of order ``n``: entries ``±1/sqrt(n)``, symmetric when ``n`` is a power of two.

    Raises:
      ValueError: naming ``n`` when no construction here reaches it.

    Examples:
      >>> h = hadamard(4)
      >>> (h * 2).astype(int).tolist()
      [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
      >>> bool(jnp.allclose(hadamard(12) @ hadamard(12).T, jnp.eye(12), atol=1e-6))
      True
      >>> hadamard(6)
      Traceback (most recent call last):
      ...
      ValueError: hadamard size: no Hadamard matrix of order 6 is built here (supported: ...)
    """
    power, paley = _checked_factor(n, "hadamard size")
    sylvester = np.ones((1, 1), np.int64)
    while sylvester.shape[0] < power:
        sylvester = np.kron(np.array([[1, 1], [1, -1]]), sylvester)
    return jnp.asarray(np.kron(sylvester, paley) / np.sqrt(n), dtype)


def hadamard_transform(x: jax.typing.ArrayLike, *, path: str = "") -> jax.Array:
    """``x @ hadamard(n)`` along the last axis (length ``n``), in O(n log n) for the power-of-two part.

    Jittable; computed in float32 and returned in ``x``'s dtype. Applying it twice is the identity
    when ``n`` is a power of two (the matrix is symmetric and orthogonal).

    Examples:
      >>> x = jax.random.normal(jax.random.key(0), (3, 24))
      >>> bool(jnp.allclose(hadamard_transform(x), x @ hadamard(24), atol=1e-5))
      True
      >>> y = jnp.arange(8.0)
      >>> bool(jnp.allclose(hadamard_transform(hadamard_transform(y)), y, atol=1e-5))
      True
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{_checks.prefix(path)}hadamard_transform needs at least one axis, got a scalar")
    n = x.shape[-1]
    power, paley = _checked_factor(n, f"{path or 'hadamard_transform'} last axis")
    batch = x.shape[:-1]
    y = x.astype(jnp.float32).reshape(*batch, power, n // power)
    h = 1
    while h < power:  # one butterfly per bit of the row index of S_{2^k}
        y = y.reshape(*batch, power // (2 * h), 2, h, n // power)
        a, b = y[..., 0, :, :], y[..., 1, :, :]
        y = jnp.stack([a + b, a - b], axis=-3)
        h *= 2
    y = y.reshape(*batch, power, n // power)
    if paley.shape[0] > 1:
        y = jnp.matmul(y, jnp.asarray(paley, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (y.reshape(x.shape) / np.sqrt(n)).astype(x.dtype)


def random_hadamard(n: int, key: jax.Array, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """``diag(±1) @ hadamard(n)`` with random signs from ``key``: QuaRot's randomized Hadamard rotation.

    Examples:
      >>> q = random_hadamard(8, jax.random.key(0))
      >>> bool(jnp.allclose(q @ q.T, jnp.eye(8), atol=1e-6))
      True
    """
    signs = jax.random.rademacher(key, (n,), jnp.float32)
    return (signs[:, None] * hadamard(n, jnp.float32)).astype(dtype)
