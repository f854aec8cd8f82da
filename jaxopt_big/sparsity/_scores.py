"""Pruning scores: higher means more important; the lowest scores are pruned first.

Every score function returns a pytree with the structure of ``params`` (compressed leaves are
scored on their dense value). NaN scores are ranked lowest by the mask builders.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree

__all__ = ["magnitude", "saliency", "random"]


def magnitude(params: Any) -> Any:
    """Magnitude score ``|w|`` of every leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> magnitude({"kernel": jnp.array([[-2.0, 1.0]])})["kernel"].tolist()
      [[2.0, 1.0]]
    """
    return jax.tree.map(jnp.abs, _leaves.densify(params))


def saliency(params: Any, grads: Any) -> Any:
    """Gradient saliency ``|w * g|`` (first-order Taylor estimate of the loss change when zeroing w).

    Raises:
      ValueError: ``grads`` has another tree structure or a leaf has another shape than ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> saliency({"k": jnp.array([2.0, -1.0])}, {"k": jnp.array([0.5, 3.0])})["k"].tolist()
      [1.0, 3.0]
    """
    params = _leaves.densify(params)
    p_def, g_def = jax.tree.structure(params), jax.tree.structure(grads)
    if p_def != g_def:  # type: ignore[operator]  # jax's PyTreeDef alias does not resolve for mypy
        raise ValueError(f"saliency: grads have structure {g_def}, params have {p_def}")

    def one(path, w, g):
        if jnp.shape(w) != jnp.shape(g):
            raise ValueError(f"{path}: gradient shape {jnp.shape(g)} differs from parameter shape {jnp.shape(w)}")
        return jnp.abs(w * g)

    return _tree.map_with_path(one, params, grads)


def uniform_like(key: jax.Array, x: jax.Array) -> jax.Array:
    """Uniform [0, 1) values of ``x``'s shape, generated sharded as ``x`` is on explicit mesh axes.

    Masks built from them then have the parameter's sharding, which ``lax.cond``/``where`` against
    the parameter's other masks require. The mesh comes from ``x``: with or without ``jax.set_mesh``.
    """
    sharding = jax.typeof(x).sharding
    if all(a is None for a in sharding.spec):
        return jax.random.uniform(key, jnp.shape(x))
    if not _checks.is_traced(x):
        sharding = x.sharding  # its concrete mesh: the key can be placed on it without jax.set_mesh
    on = lambda spec: jax.sharding.NamedSharding(sharding.mesh, spec)
    return jax.random.uniform(jax.sharding.reshard(key, on(jax.P())), x.shape, out_sharding=on(sharding.spec))


def random(params: Any, key: jax.Array) -> Any:
    """Uniform random scores in [0, 1) (random pruning), one independent stream per leaf.

    The scores of a leaf sharded over explicit mesh axes are sharded like it (and equal to the
    unsharded ones).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> s = random({"k": jnp.ones((2, 3))}, jax.random.key(0))["k"]
      >>> s.shape, bool(((s >= 0) & (s < 1)).all())
      ((2, 3), True)
    """
    params = _leaves.densify(params)
    flat, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(flat), 1))
    return jax.tree.unflatten(treedef, [uniform_like(k, x) for k, x in zip(keys, flat)])
