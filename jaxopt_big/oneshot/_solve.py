"""One layer's plan on its 2-d view: prune (magnitude, Wanda, SparseGPT), then quantize (RTN, GPTQ).

The solvers are the library's tested per-layer ones (``sparsity.wanda_kernel``,
``sparsity.sparsegpt_kernel``, ``quant.gptq_kernel``); this module only chooses and chains them.
SparseGPT then GPTQ quantizes the survivors with error feedback while the pruned weights stay zero
(the joint mode of the SparseGPT paper).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_big import calibration as _calibration
from jaxopt_big import recipe as _recipe
from jaxopt_big.quant import _gptq
from jaxopt_big.quant import _spec as _qspec
from jaxopt_big.sparsity import _masks, _oneshot

__all__ = ["Solved", "solve"]


@dataclasses.dataclass(frozen=True)
class Solved:
    """A compressed ``(d_in, d_out)`` view.

    Attributes:
      matrix: the dense float32 value the layer computes with from now on.
      quant: the 2-d ``QArray`` when an integer grid quantized it (scales per view row group), else None.
      fmt: a non-integer format (float8, binary...) to store the kernel in, applied in its own layout.
      error: relative output error ``||X W' - X W||^2 / ||X W||^2`` on the calibration rows.
    """

    matrix: jax.Array
    quant: Any
    fmt: Any
    error: float


def _structure(sparsity: Any) -> tuple[float, Any]:
    """``(fraction, structure)`` as the per-layer solvers take them."""
    return (0.0, sparsity) if isinstance(sparsity, _masks.NM) else (float(sparsity), None)


def _prune(path: str, w: jax.Array, hessian: jax.Array, pruner: Any) -> jax.Array:
    if isinstance(pruner, _recipe.Magnitude):
        return jnp.where(_recipe._prune_masks({"w": w}, pruner.sparsity)["w"], w, 0.0)
    fraction, structure = _structure(pruner.sparsity)
    if isinstance(pruner, _recipe.Wanda):
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(hessian), 0.0))
        return _oneshot.wanda_kernel(w, norms, fraction, structure=structure, path=path)
    return _oneshot.sparsegpt_kernel(w, hessian, fraction, structure=structure, block_size=pruner.block_size,
                                     damp=pruner.damp, path=path)


def _quantize(path: str, w: jax.Array, hessian: jax.Array, quantizer: Any, pruned: jax.Array | None) -> Any:
    if isinstance(quantizer, _recipe.GPTQ):
        return _gptq.gptq_kernel(w, hessian, quantizer.spec, block_size=quantizer.block_size, damp=quantizer.damp,
                                 act_order=quantizer.act_order, pruned=pruned, path=path)
    return quantizer.spec.quantize(w, path=path)


def relative_error(w: jax.Array, new: jax.Array, hessian: jax.Array) -> jax.Array:
    """``tr(D^T H D) / tr(W^T H W)`` with ``D = new - w``: the relative output error on the rows of ``H``."""
    d = new - w
    return jnp.sum(d * (hessian @ d)) / jnp.maximum(jnp.sum(w * (hessian @ w)), jnp.finfo(jnp.float32).tiny)


@functools.partial(jax.jit, static_argnames=("plan",))
def _solve(w: jax.Array, hessian: jax.Array, plan: _recipe.Plan):
    """The plan on one view, compiled once per (plan, shape)."""
    pruner, quantizer = plan.pruner, plan.quantizer
    new, quant = w, None
    if pruner is not None:
        new = _prune("kernel", w, hessian, pruner)
    if quantizer is not None:
        pruned = new == 0 if pruner is not None else None  # zeros stay zero through GPTQ's updates
        if isinstance(quantizer, _recipe.RTN) and not isinstance(quantizer.spec, _qspec.QuantSpec):
            new = quantizer.spec.fake_quant(new)
        else:
            quant = _quantize("kernel", new, hessian, quantizer, pruned)
            new = quant.dense().astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(new))
    for method in (pruner, quantizer):  # the solvers' own damped inverse (XLA computes it once)
        if isinstance(method, (_recipe.SparseGPT, _recipe.GPTQ)):
            finite &= jnp.all(jnp.isfinite(_calibration.inverse_hessian(hessian, damp=method.damp)[0]))
    return new, quant, relative_error(w, new, hessian), finite


def solve(path: str, w: jax.Array, hessian: jax.Array, plan: _recipe.Plan) -> Solved:
    """Applies ``plan`` to the float32 view ``w`` with input Hessian ``hessian``.

    Raises:
      ValueError: the plan does not fit the layer, or its Hessian is not positive definite after
        damping (the solver produced NaN); the message names ``path``.
    """
    try:
        new, quant, error, finite = _solve(w, hessian, plan)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path}: {str(e).removeprefix('kernel: ')}") from None
    if not bool(finite):
        raise ValueError(f"{path}: the input Hessian is not positive definite after damping (or holds NaN/inf); "
                         "raise the method's damp or check the calibration data")
    quantizer = plan.quantizer
    fmt = quantizer.spec if isinstance(quantizer, _recipe.RTN) and not isinstance(
        quantizer.spec, _qspec.QuantSpec) else None
    return Solved(matrix=new, quant=quant, fmt=fmt, error=float(error))
