"""Pruning scores: higher means more important; the lowest scores are pruned first.

Every score function returns a pytree with the structure of ``params`` (compressed leaves are
scored on their dense value). NaN scores are ranked lowest by the mask builders.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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


def random(params: Any, key: jax.Array) -> Any:
    """Uniform random scores in [0, 1) (random pruning), one independent stream per leaf.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> s = random({"k": jnp.ones((2, 3))}, jax.random.key(0))["k"]
      >>> s.shape, bool(((s >= 0) & (s < 1)).all())
      ((2, 3), True)
    """
    params = _leaves.densify(params)
    flat, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(flat), 1))
    return jax.tree.unflatten(treedef, [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, flat)])
