"""One-shot pruning with calibration data: Wanda and SparseGPT.

Both work on Dense kernels ``(d_in, d_out)`` and need statistics of the layer inputs ``X`` gathered
on calibration batches (:func:`jaxopt_big.calibration.sequential`):

- **Wanda** scores ``|W_ij| * ||X_i||_2`` and drops the lowest-scoring weights of every output
  separately (or ``n:m`` per group of ``m`` consecutive inputs). No weight update.
- **SparseGPT** prunes column block by column block of ``W^T`` (rows = outputs) and, after each
  pruned input column, updates the not-yet-visited columns with the optimal-brain-surgeon
  correction from the inverse input Hessian ``(X^T X + λI)^-1``; updates to later blocks are applied
  lazily, once per block. Masks are chosen per block by ``w^2 / [H^-1]_ii^2`` (``n:m``: per group of
  ``m`` inputs, when the group is reached).

Per-kernel functions (``wanda_kernel``, ``sparsegpt_kernel``) plug into
``calibration.sequential`` as the ``compress`` callback; ``wanda``/``sparsegpt`` apply them to a
parameter tree given per-layer statistics keyed by module path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import _deprecation
from jaxopt_big import calibration as _calibration
from jaxopt_big.sparsity._masks import NM, Unstructured

__all__ = ["wanda_params", "wanda_kernel", "sparsegpt_params", "sparsegpt_kernel", "wanda", "sparsegpt"]


def _nm(structure: Any, path: str) -> tuple[int, int] | None:
    """``(n, m)`` of an ``NM(n, m)`` structure, None for unstructured."""
    if structure is None or isinstance(structure, Unstructured):
        return None
    if not isinstance(structure, NM):
        raise TypeError(f"{path}: structure must be None, Unstructured() or NM(n, m), got {structure!r}")
    return structure.n, structure.m


def _check(path: str, kernel: Any, sparsity: float, nm: tuple[int, int] | None) -> jax.Array:
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{path}: one-shot pruning needs a 2-d Dense kernel, got shape {kernel.shape}")
    if nm is None:
        _checks.fraction(f"{path}: sparsity", sparsity)
    if nm is not None and kernel.shape[0] % nm[1]:
        raise ValueError(f"{path}: input axis {kernel.shape[0]} is not divisible by m={nm[1]}")
    return kernel


def _prune_lowest(scores: jax.Array, k: int, axis: int) -> jax.Array:
    """Bool mask (True = pruned) of the ``k`` lowest scores along ``axis`` (ties: lower index first)."""
    ranks = jnp.argsort(jnp.argsort(scores, axis=axis, stable=True), axis=axis, stable=True)
    return ranks < k


def wanda_kernel(kernel: jax.typing.ArrayLike, norms: jax.typing.ArrayLike, sparsity: float = 0.5, *,
                 structure: Any = None, path: str = "kernel") -> jax.Array:
    """Wanda-pruned copy of a Dense kernel ``(d_in, d_out)``.

    Args:
      kernel: the kernel.
      norms: ``(d_in,)`` L2 norms of each input feature over the calibration rows
        (``LayerStats.norms``).
      sparsity: fraction pruned in every output column (ignored with ``NM``).
      structure: None / ``Unstructured()`` or ``NM(n, m)``: keep ``n`` of every ``m`` consecutive inputs.
      path: name used in error messages.

    Examples:
      >>> w = jnp.array([[1.0, -4.0], [2.0, 1.0], [-3.0, 0.5], [0.1, 2.0]])
      >>> wanda_kernel(w, jnp.array([1.0, 1.0, 1.0, 10.0]), 0.5).tolist()
      [[0.0, -4.0], [2.0, 0.0], [-3.0, 0.0], [0.0, 2.0]]
    """
    nm = _nm(structure, path)
    kernel = _check(path, kernel, sparsity, nm)
    _checks.finite([(path, kernel), (f"{path} activation norms", norms)], "Wanda inputs")
    norms = jnp.asarray(norms, jnp.float32)
    if norms.shape != kernel.shape[:1]:
        raise ValueError(f"{path}: activation norms have shape {norms.shape}, expected ({kernel.shape[0]},)")
    scores = jnp.abs(kernel.astype(jnp.float32)) * norms[:, None]
    if nm is None:
        pruned = _prune_lowest(scores, int(round(sparsity * kernel.shape[0])), axis=0)
    else:
        n, m = nm
        grouped = scores.reshape(-1, m, kernel.shape[1])
        pruned = _prune_lowest(grouped, m - n, axis=1).reshape(kernel.shape)
    return jnp.where(pruned, jnp.zeros_like(kernel), kernel)


@functools.partial(jax.jit, static_argnames=("prune_count", "nm"))
def _sparsegpt_block(w1: jax.Array, hinv1: jax.Array, prune_count: int, nm: tuple[int, int] | None):
    """One block of columns of ``W`` (rows = outputs): prune column by column with OBS updates."""
    rows, cols = w1.shape
    d = jnp.diagonal(hinv1)
    if nm is None:  # the block's mask, chosen once up front
        flat = (w1 ** 2 / d[None, :] ** 2).reshape(-1)
        mask = _prune_lowest(flat, prune_count, axis=0).reshape(rows, cols)
    else:
        mask = jnp.zeros((rows, cols), bool)

    def body(i, carry):
        w1, mask, err1 = carry
        if nm is not None:  # choose the group's mask when reaching its first column
            n, m = nm
            group = jax.lax.dynamic_slice(w1, (0, i), (rows, m)) ** 2 / jax.lax.dynamic_slice(d, (i,), (m,)) ** 2
            updated = jax.lax.dynamic_update_slice(mask, _prune_lowest(group, m - n, axis=1), (0, i))
            mask = jnp.where(i % m == 0, updated, mask)
        w = w1[:, i]
        err = jnp.where(mask[:, i], w, 0.0) / d[i]
        # hinv1 is upper triangular: this updates columns >= i only, and sets column i to its pruned value
        w1 = w1 - err[:, None] * hinv1[i][None, :]
        return w1, mask, err1.at[:, i].set(err)

    w1, mask, err1 = jax.lax.fori_loop(0, cols, body, (w1, mask, jnp.zeros_like(w1)))
    return jnp.where(mask, 0.0, w1), err1


def sparsegpt_kernel(kernel: jax.typing.ArrayLike, hessian: jax.typing.ArrayLike, sparsity: float = 0.5, *,
                     structure: Any = None, block_size: int = 128, damp: float = 0.01,
                     path: str = "kernel") -> jax.Array:
    """SparseGPT-pruned (and OBS-updated) copy of a Dense kernel ``(d_in, d_out)``.

    Args:
      kernel: the kernel.
      hessian: ``(d_in, d_in)`` input Hessian ``X^T X`` (``LayerStats.hessian``).
      sparsity: fraction pruned, exactly, within every block of ``block_size`` inputs (ignored with ``NM``).
      structure: None / ``Unstructured()`` or ``NM(n, m)``.
      block_size: inputs per lazy-update block (a multiple of ``m`` for ``NM``).
      damp: diagonal damping as a fraction of the mean Hessian diagonal.
      path: name used in error messages.

    Examples:
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 4))
      >>> pruned = sparsegpt_kernel(w, x.T @ x, 0.5)
      >>> float((pruned == 0).mean())
      0.5
      >>> err = lambda k: float(jnp.sum((x @ k - x @ w) ** 2))
      >>> err(pruned) < err(jnp.where(pruned == 0, 0.0, w))   # the update beats just masking
      True
    """
    nm = _nm(structure, path)
    kernel = _check(path, kernel, sparsity, nm)
    block_size = _checks.integer(f"{path}: block_size", block_size, low=1)
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"{path}: block_size must be a multiple of m={nm[1]} for NM, got {block_size!r}")
    d_in = kernel.shape[0]
    if jnp.shape(hessian) != (d_in, d_in):
        raise ValueError(f"{path}: hessian has shape {jnp.shape(hessian)}, expected {(d_in, d_in)}")
    _checks.finite([(path, kernel), (f"{path} hessian", hessian)], "SparseGPT inputs")
    hinv, dead = _calibration.inverse_hessian(hessian, damp=damp)
    w = jnp.where(dead[None, :], 0.0, kernel.T.astype(jnp.float32))
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        count = int(round(sparsity * w.shape[0] * (i2 - i1))) if nm is None else 0
        q1, err1 = _sparsegpt_block(w[:, i1:i2], hinv[i1:i2, i1:i2], count, nm)
        w = w.at[:, i1:i2].set(q1).at[:, i2:].add(-err1 @ hinv[i1:i2, i2:])
    return w.T.astype(kernel.dtype)


def wanda_params(params: Any, activation_norms: Mapping[str, jax.typing.ArrayLike], sparsity: float = 0.5, *,
          structure: Any = None) -> Any:
    """Wanda-prunes the kernel of every layer named in ``activation_norms``.

    Args:
      params: parameters (linen ``params`` collection or full variables).
      activation_norms: ``{module path: (d_in,) input norms}``, e.g.
        ``{p: s.norms for p, s in stats.items()}`` from :func:`jaxopt_big.calibration.sequential`.
      sparsity: as in :func:`wanda_kernel`, or ``[jb.tree.Rule(regex, fraction), ...]`` among the
        named layers' kernels (first match wins; unclaimed kernels stay dense; see :mod:`jaxopt_big.tree`).
      structure: as in :func:`wanda_kernel`.

    Examples:
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -4.0], [2.0, 1.0]]), "bias": jnp.zeros(2)}}
      >>> wanda_params(params, {"Dense_0": jnp.array([1.0, 1.0])}, 0.5)["Dense_0"]["kernel"].tolist()
      [[0.0, -4.0], [2.0, 0.0]]
    """
    return _calibration.map_kernels(lambda p, k, n, s: wanda_kernel(k, n, s, structure=structure, path=p),
                                    params, activation_norms, sparsity, what="sparsity")


def sparsegpt_params(params: Any, hessians: Mapping[str, jax.typing.ArrayLike], sparsity: float = 0.5, *,
              structure: Any = None, block_size: int = 128, damp: float = 0.01) -> Any:
    """SparseGPT-prunes the kernel of every layer named in ``hessians`` (each from its own Hessian).

    For the sequential variant (later layers calibrated on the pruned earlier ones) pass
    :func:`sparsegpt_kernel` to :func:`jaxopt_big.calibration.sequential` instead. ``sparsity`` may
    be ``[jb.tree.Rule(regex, fraction), ...]``, as in :func:`wanda`.

    Examples:
      >>> x = jax.random.normal(jax.random.key(0), (32, 4))
      >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(1), (4, 4))}}
      >>> out = sparsegpt_params(params, {"Dense_0": x.T @ x}, 0.5)
      >>> int((out["Dense_0"]["kernel"] == 0).sum())
      8
    """
    return _calibration.map_kernels(lambda p, k, h, s: sparsegpt_kernel(
        k, h, s, structure=structure, block_size=block_size, damp=damp, path=p), params, hessians, sparsity,
        what="sparsity")


wanda = _deprecation.alias(wanda_params, "jb.sparsity.wanda", "jb.sparsity.wanda_params")
sparsegpt = _deprecation.alias(sparsegpt_params, "jb.sparsity.sparsegpt", "jb.sparsity.sparsegpt_params")
