"""One layer's plan on its 2-d view: its methods in order (prune, then quantize), through their protocol.

The solvers are the methods' own (:class:`jaxopt_big.recipe.Method`); this module only chains them,
measures the error and checks the result. SparseGPT then GPTQ quantizes the survivors with error
feedback while the pruned weights stay zero (the joint mode of the SparseGPT paper).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_big import leaves as _leaves
from jaxopt_big import recipe as _recipe

__all__ = ["Solved", "solve"]


@dataclasses.dataclass(frozen=True)
class Solved:
    """A compressed ``(d_in, d_out)`` view.

    Attributes:
      matrix: the dense float32 value the layer computes with from now on.
      quant: the 2-d ``QArray`` when a method chose an integer grid (scales per view row group), else None.
      error: relative output error ``||X W' - X W||^2 / ||X W||^2`` on the calibration rows.
      energy: the output energy ``||X W||^2 = tr(W^T H W)``: ``error * energy`` is the absolute
        output error, which adds up across layers.
    """

    matrix: jax.Array
    quant: Any
    error: float
    energy: float


def relative_error(w: jax.Array, new: jax.Array, hessian: jax.Array) -> jax.Array:
    """``tr(D^T H D) / tr(W^T H W)`` with ``D = new - w``: the relative output error on the rows of ``H``."""
    d = new - w
    return jnp.sum(d * (hessian @ d)) / jnp.maximum(jnp.sum(w * (hessian @ w)), jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True, eq=False)
class _Name:
    """A layer's name as a static jit argument that does not key the compile cache (one compile per
    plan and shape): it only names the layer in errors raised while tracing, and a trace that raises
    is not cached, so every failing layer is traced, and named, itself."""

    path: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Name)

    def __hash__(self) -> int:
        return 0


@functools.partial(jax.jit, static_argnames=("plan", "name"))
def _solve(w: jax.Array, hessian: jax.Array, plan: _recipe.Plan, name: _Name):
    """The plan on one view, compiled once per (plan, shape)."""
    new, quant, pruned = w, None, None
    for method in plan.methods:
        out = method.solve(new, hessian, pruned=pruned, path=name.path)
        quant = out if _leaves.is_compressed(out) else None
        new = out.dense().astype(jnp.float32) if quant is not None else out
        pruned = new == 0  # zeros stay zero through the later methods' updates
    finite = jnp.all(jnp.isfinite(new))
    for method in plan.methods:
        finite &= method.well_posed(hessian)
    return new, quant, relative_error(w, new, hessian), jnp.sum(w * (hessian @ w)), finite, jnp.sum(~jnp.isfinite(w))


def solve(path: str, w: jax.Array, hessian: jax.Array, plan: _recipe.Plan) -> Solved:
    """Applies ``plan`` to the float32 view ``w`` with input Hessian ``hessian``.

    Raises:
      ValueError: the plan does not fit the layer, its kernel holds NaN/inf, or its Hessian is not
        positive definite after damping (the solver produced NaN); the message names ``path``.
    """
    new, quant, error, energy, finite, bad_weights = _solve(w, hessian, plan.for_layer(path), _Name(path))
    if int(bad_weights):  # the weight itself, not the calibration data
        raise ValueError(f"{path}/kernel: the weights hold NaN or inf ({int(bad_weights)} of {w.size} values)")
    if not bool(finite):
        raise ValueError(f"{path}: the input Hessian is not positive definite after damping (or holds NaN/inf); "
                         "raise the method's damp or check the calibration data")
    return Solved(matrix=new, quant=quant, error=float(error), energy=float(energy))
