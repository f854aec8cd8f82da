"""Post-training quantization of parameter trees, and static activation scales from calibration batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_big import _deprecation
from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.quant import _spec
from jaxopt_big.quant._calibrate import calibrate

__all__ = ["quantize_params", "dequantize_params", "fake_quant_params", "calibrate_activations", "Scale"]

Specs = _spec.Format | Sequence[_tree.Rule]


def _per_leaf(params: Any, specs: Specs, where: _tree.Where, fn: Callable[[str, Any, _spec.Format], Any]) -> Any:
    def one(path, x, spec):
        if not isinstance(spec, _spec.Format):
            raise TypeError(f"{path}: spec must be a QuantSpec/Format (or None in a rule), got {spec!r}")
        return fn(path, x, spec)
    return _tree.map_float_kernels(one, params, specs, where, purpose="to quantize", what="spec")


def quantize_params(params: Any, spec: Specs, *, where: _tree.Where = _tree.KERNELS) -> Any:
    """Replaces the selected leaves by quantized leaves (:class:`QArray` for integer specs).

    Args:
      params: parameter pytree (linen params, ``nnx.State``...).
      spec: one :class:`QuantSpec`/:class:`Format` for every selected leaf, or rules
        ``[jb.tree.Rule(regex, spec or None), ...]`` assigned among the selected leaves (first match
        wins; leaves no rule claims, or claimed with ``None``, stay dense; see :mod:`jaxopt_big.tree`).
      where: the candidate leaves (default: float kernels with ndim >= 2; leaves that are compressed
        already stay as they are). A ``where`` or rule that selects a compressed leaf raises ValueError.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxopt_big.tree import Rule
      >>> from jaxopt_big.quant._spec import QuantSpec
      >>> p = {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
      >>> q = quantize_params(p, [Rule("Dense_0", QuantSpec(bits=4))])
      >>> type(q["Dense_0"]["kernel"]).__name__, q["Dense_0"]["bias"].dtype
      ('QArray', dtype('float32'))
    """
    return _per_leaf(params, spec, where, lambda p, x, s: s.quantize(x, path=p))


def fake_quant_params(params: Any, spec: Specs, *, where: _tree.Where = _tree.KERNELS) -> Any:
    """Fake-quantizes the selected leaves (straight-through gradients): weight QAT as a pure tree function.

    Use inside the loss, ``apply(fake_quant_params(params, spec), x)``; arguments as in
    :func:`quantize_params`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt_big.quant._spec import QuantSpec
      >>> p = {"k": {"kernel": jnp.array([[0.1, 1.0], [0.3, -1.0]])}}
      >>> fake_quant_params(p, QuantSpec(bits=2))["k"]["kernel"].tolist()
      [[0.0, 1.0], [0.0, -1.0]]
      >>> jax.grad(lambda p: fake_quant_params(p, QuantSpec(bits=2))["k"]["kernel"].sum())(p)["k"]["kernel"].tolist()
      [[1.0, 1.0], [1.0, 1.0]]
    """
    return _per_leaf(params, spec, where, lambda p, x, s: s.fake_quant(x, path=p))


dequantize_params = _deprecation.alias(_leaves.densify, "jb.quant.dequantize_params", "jb.leaves.densify")


class Scale(NamedTuple):
    """A static activation scale (and zero point, None when symmetric) of one layer's inputs."""

    scale: jax.Array
    zero_point: jax.Array | None


def calibrate_activations(fn: Any, batches: Iterable[tuple], spec: _spec.Format, *,
                          where: str | Sequence[str] | Callable | None = None) -> dict[str, Scale]:
    """Static input scales of the selected Dense/Conv/Einsum layers from ``N`` calibration batches.

    The inputs each layer sees over all batches are calibrated together with ``spec``'s calibrator
    (absmax, min-max, percentile or MSE). Pass the result to :func:`jaxopt_big.quant._qat` as ``scales``.

    Args:
      fn: linen apply function or nnx module (as for :func:`jaxopt_big.intercept.capture`).
      batches: iterable of argument tuples for ``fn``, e.g. ``[(variables, x) for x in xs]``.
      spec: activation format; per-tensor or per-channel (``PER_TOKEN`` scales cannot be static).
      where: module-path selection (None: every layer).

    Returns:
      ``{module_path: Scale(scale, zero_point)}``.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxopt_big.quant._spec import QuantSpec
      >>> model = nn.Dense(2)
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> s = calibrate_activations(model.apply, [(v, jnp.full((4, 3), 2.0)), (v, -jnp.ones((4, 3)))], QuantSpec())
      >>> float(s[""].scale.squeeze() * 127)
      2.0
    """
    if isinstance(getattr(spec, "granularity", None), _spec.PerToken):
        raise ValueError(f"PER_TOKEN activation scales are dynamic; calibrate_activations needs per-tensor or "
                         f"per-channel, got {spec!r}")
    run = _intercept.capture(fn, where)
    run = run if isinstance(fn, nnx.Module) else jax.jit(run)  # nnx modules carry state jit cannot close over
    seen: dict[str, list[jax.Array]] = {}
    n = 0
    for args in batches:
        _, records = run(*args)
        for path, rec in records.items():
            seen.setdefault(path, []).append(rec.inputs)
        n += 1
    if n == 0:
        raise ValueError("calibrate_activations needs at least one batch, got none")
    return {path: Scale(*calibrate(jnp.concatenate(xs, axis=0), spec, path=path)) for path, xs in seen.items()}
