"""Running models whose kernels are ``LowRank`` or ``LoRA`` leaves without densifying them.

A thin name for :func:`jaxopt_big.intercept.run_compressed`: a Dense/DenseGeneral/Conv layer whose
kernel is ``LowRank(u, v)`` runs its own contraction with ``u`` (to ``r`` features) and then ``v``; a
``LoRA`` kernel adds ``scale * (x @ a) @ b`` to its base's output (the base itself may be ``LowRank``
or quantized). Both are the kinds' execution hooks, dispatched by ``intercept``; other layers
holding compressed kernels run on their dense value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big.lowrank._factorize import LowRank
from jaxopt_big.lowrank._lora import LoRA

__all__ = ["apply", "densify"]


def apply(fn: Any, where: Any = None) -> Callable[..., Any]:
    """Wraps a linen apply function or an nnx module so factored kernels run factored.

    Args:
      fn: ``model.apply`` (or any function calling it) or an nnx module whose ``Param`` values may
        be ``LowRank``/``LoRA`` leaves.
      where: module-path selection as in :func:`jaxopt_big.intercept.replace`; ``None``: all layers.

    Returns:
      A function with ``fn``'s arguments and outputs; it jits and differentiates through the factors.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxopt_big.lowrank import factorize_params
      >>> model = nn.Dense(4)
      >>> x = jnp.ones((2, 8))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> low = factorize_params(params, rank=4)
      >>> y = apply(model.apply)({"params": low}, x)
      >>> bool(jnp.allclose(y, model.apply({"params": densify(low)}, x), atol=1e-5))
      True
    """
    return _intercept.run_compressed(fn, where)


def densify(tree: Any) -> Any:
    """Replaces ``LowRank`` and ``LoRA`` leaves (merged) by dense arrays; other leaves stay.

    Examples:
      >>> import jax.numpy as jnp
      >>> densify({"k": LowRank(u=jnp.ones((3, 1)), v=jnp.ones((1, 2)))})["k"].tolist()
      [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    return _leaves.map(lambda x: x.dense() if isinstance(x, (LowRank, LoRA)) else x, tree)
