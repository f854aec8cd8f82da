"""SmoothQuant: migrate activation outliers into the weights before W8A8 (Xiao et al., 2023).

Per input channel ``j`` of the linears that read one input, ``s_j = max|X_j|^α / max|W_j|^(1-α)``;
the input becomes ``X diag(1/s)`` (folded into the preceding RMSNorm weight or linear) and each
kernel ``diag(s) W``, so ``X W`` is unchanged in exact arithmetic while the activation channels get
flatter and easier to quantize per token. ``α`` (0.5 by default) sets how much of the range moves
into the weights.

:func:`scale_input_channels` and :func:`unscale_output_channels` apply any such per-channel
migration (SmoothQuant's and AWQ's alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxopt_big import _checks

__all__ = ["smoothquant_scales", "scale_input_channels", "unscale_output_channels"]


def smoothquant_scales(act_absmax: jax.typing.ArrayLike, kernels: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike],
                       *, alpha: float = 0.5, path: str = "kernel") -> jax.Array:
    """SmoothQuant's per-input-channel scales ``s = max|X|^α / max|W|^(1-α)`` (both clamped at 1e-5, as the reference).

    Args:
      act_absmax: ``(d_in,)`` largest ``|x|`` per input channel over the calibration inputs.
      kernels: a Dense kernel ``(d_in, d_out)`` or a sequence of them with the same ``d_in`` (the
        linears that read this input); ``max|W_j|`` is taken over all of them.
      alpha: migration strength in [0, 1].
      path: layer name used in error messages.

    Returns:
      ``(d_in,)`` float32 scales: :func:`scale_input_channels` for the kernels,
      :func:`unscale_output_channels` for the op that produces the input.

    Examples:
      >>> w = jnp.array([[1.0, -4.0], [0.5, 0.25]])
      >>> smoothquant_scales(jnp.array([16.0, 1.0]), w).tolist()   # sqrt(16 / 4), sqrt(1 / 0.5)
      [2.0, 1.4142135381698608]
      >>> smoothquant_scales(jnp.ones(3), w)
      Traceback (most recent call last):
      ...
      ValueError: kernel: act_absmax has shape (3,), expected (2,)
    """
    group = [jnp.asarray(k) for k in (kernels if isinstance(kernels, (list, tuple)) else [kernels])]
    if not group or any(k.ndim != 2 or k.shape[0] != group[0].shape[0] for k in group):
        raise ValueError(f"{path}: SmoothQuant needs 2-d kernels (d_in, d_out) with one d_in, got shapes "
                         f"{[tuple(k.shape) for k in group]}")
    alpha = _checks.number(f"{path}: SmoothQuant alpha", alpha, low=0, high=1)
    act = jnp.asarray(act_absmax, jnp.float32)
    if act.shape != (group[0].shape[0],):
        raise ValueError(f"{path}: act_absmax has shape {act.shape}, expected {(group[0].shape[0],)}")
    _checks.finite([(f"{path} act_absmax", act)] + [(path, k) for k in group], "SmoothQuant inputs")
    weight_max = jnp.max(jnp.stack([jnp.abs(k.astype(jnp.float32)).max(axis=1) for k in group]), axis=0)
    return _scales(act, weight_max, alpha)


@jax.jit
def _scales(act: jax.Array, weight_max: jax.Array, alpha: float) -> jax.Array:
    return jnp.maximum(jnp.maximum(act, 1e-5) ** alpha / jnp.maximum(weight_max, 1e-5) ** (1 - alpha), 1e-5)


def _checked(param: jax.typing.ArrayLike, scales: jax.typing.ArrayLike, axis: int, path: str
             ) -> tuple[jax.Array, jax.Array]:
    param, scales = jnp.asarray(param), jnp.asarray(scales)
    if param.ndim < -axis or scales.shape != (param.shape[axis],):
        raise ValueError(f"{path}: scales of shape {scales.shape} do not match axis {axis} of shape {param.shape}")
    return param, scales


def scale_input_channels(kernel: jax.typing.ArrayLike, scales: jax.typing.ArrayLike, *,
                         path: str = "kernel") -> jax.Array:
    """``diag(s) @ kernel``: row ``j`` (input channel) of a kernel ``(..., d_in, d_out)`` times ``s_j``.

    Examples:
      >>> scale_input_channels(jnp.ones((2, 3)), jnp.array([2.0, 0.5])).tolist()
      [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]]
    """
    kernel, scales = _checked(kernel, scales, -2, path)
    return (kernel * scales[:, None].astype(kernel.dtype)).astype(kernel.dtype)


def unscale_output_channels(param: jax.typing.ArrayLike, scales: jax.typing.ArrayLike, *,
                            path: str = "param") -> jax.Array:
    """``param / s`` along the last axis: what the op producing the scaled input absorbs.

    ``param`` is an RMSNorm / LayerNorm weight or bias ``(d,)``, or the kernel ``(..., d)`` (and
    bias) of the linear before. With :func:`scale_input_channels` on the next kernels, the product
    is unchanged: ``(x * g / s) @ (diag(s) W) == (x * g) @ W``.

    Examples:
      >>> g, w, s = jnp.array([1.0, 3.0]), jnp.array([[1.0], [2.0]]), jnp.array([4.0, 0.5])
      >>> x = jnp.array([[0.5, -1.0]])
      >>> ((x * unscale_output_channels(g, s)) @ scale_input_channels(w, s)).tolist(), ((x * g) @ w).tolist()
      ([[-5.5]], [[-5.5]])
    """
    param, scales = _checked(param, scales, -1, path)
    return (param / scales.astype(param.dtype)).astype(param.dtype)
