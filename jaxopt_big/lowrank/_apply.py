"""Running models whose kernels are ``LowRank`` or ``LoRA`` leaves without densifying them.

Built on :func:`jaxopt_big.intercept.replace`: a Dense (linen ``nn.Dense``, nnx ``Linear``) whose
kernel is ``LowRank(u, v)`` computes ``(x @ u) @ v + bias``; a Conv computes a convolution to ``r``
channels with ``u`` (HWI·r) and then the 1×1 map ``v``. A ``LoRA`` kernel adds
``scale * (x @ a) @ b`` to its base's output (the base itself may be ``LowRank`` or quantized).
Other layers holding compressed kernels run on their dense value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big.lowrank._factorize import LowRank
from jaxopt_big.lowrank._lora import LoRA

__all__ = ["apply", "densify"]

_DENSE = (nn.Dense, nnx.Linear)
_CONV = (nn.Conv, nnx.Conv)


def _matmul(x: jax.Array, kernel: Any) -> jax.Array:
    if isinstance(kernel, LowRank):
        return (x @ kernel.u) @ kernel.v
    if isinstance(kernel, LoRA):
        return _matmul(x, kernel.base) + kernel.scale * ((x @ kernel.a) @ kernel.b)
    return x @ (kernel.dense() if _leaves.is_compressed(kernel) else kernel)


def _conv(call: _intercept.Call, kernel: Any) -> jax.Array:
    """The layer's convolution with ``kernel`` and no bias; factored kernels end in a 1x1 map."""
    if isinstance(kernel, LowRank):
        return _conv(call, kernel.u) @ kernel.v
    if isinstance(kernel, LoRA):
        return _conv(call, kernel.base) + kernel.scale * (_conv(call, kernel.a) @ kernel.b)
    features = kernel.shape[-1]
    if isinstance(call.module, nn.Module):
        return call.run(params={"kernel": kernel}, features=features, use_bias=False)
    params = {"kernel": kernel}
    if "bias" in call.params:  # nnx layers cannot be reconfigured under jit: add a zero bias instead
        params["bias"] = jnp.zeros((features,), jnp.result_type(call.params["bias"]))
    return call.run(params=params)


def _factored(call: _intercept.Call) -> Any:
    kernel = call.kernel
    if not isinstance(kernel, (LowRank, LoRA)):
        return NotImplemented
    if isinstance(call.module, _DENSE):
        y = _matmul(call.inputs, kernel)
    elif isinstance(call.module, _CONV) and kernel.ndim == call.inputs.ndim:
        y = _conv(call, kernel)
    else:
        return NotImplemented
    bias = call.params.get("bias")
    return y if bias is None else y + bias


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
    return _intercept.replace(fn, where, _factored)


def densify(tree: Any) -> Any:
    """Replaces ``LowRank`` and ``LoRA`` leaves (merged) by dense arrays; other leaves stay.

    Examples:
      >>> import jax.numpy as jnp
      >>> densify({"k": LowRank(u=jnp.ones((3, 1)), v=jnp.ones((1, 2)))})["k"].tolist()
      [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    return _leaves.map(lambda x: x.dense() if isinstance(x, (LowRank, LoRA)) else x, tree)
