"""Quantized execution of Dense/DenseGeneral/Conv/Einsum layers (linen) and Linear/Conv (nnx).

`qat` wraps an apply function (or nnx module) through :func:`jaxopt_big.intercept.replace`. Each
selected layer runs its own computation with the contraction swapped for a quantized one:

* weights and activations on symmetric integer grids whose scales are constant along the
  contraction run as a real ``int8 x int8 -> int32`` ``dot_general`` / convolution, then one rescale;
* weight-only quantization multiplies by the integer weights and rescales the output (the
  dequantization happens inside the matmul), also for packed int4/int2 ``QArray`` kernels;
* anything else (group scales along the contraction, affine grids, other formats, Einsum) runs the
  float contraction on fake-quantized operands.

The forward value equals fake-quant numerics; gradients are straight-through, zero outside the
clipping range, so QAT trains on the fast integer forward. ``Gradient.QUANTIZED`` (the default) takes
the contraction's gradient at the fake-quantized operands; ``Gradient.FLOAT`` takes it at the float
operands, as qwix does, which keeps no float copy of the quantized operands for the backward pass.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxopt_big import intercept as _intercept
from jaxopt_big import tree as _tree
from jaxopt_big.quant import _spec
from jaxopt_big.quant._calibrate import expand, from_int, to_int
from jaxopt_big.quant._fake import ste
from jaxopt_big.quant._ptq import Scale
from jaxopt_big.quant._qarray import QArray

__all__ = ["qat", "Gradient"]


class Gradient(enum.Enum):
    """Where the straight-through backward pass of an integer contraction takes its gradient."""

    QUANTIZED = "quantized"  # at the fake-quantized operands: the classic fake-quant STE
    FLOAT = "float"          # at the float operands (qwix's QAT): cheaper, exact only as bits grow

_DOT_LAYERS = (nn.Dense, nn.DenseGeneral, nnx.Linear, nnx.LinearGeneral)
_CONV_LAYERS = (nn.Conv, nnx.Conv)


class _Operand(NamedTuple):
    """One side of a contraction after quantization."""

    value: jax.Array                 # fake-quant value with straight-through gradient (or the raw input)
    ints: jax.Array | None           # integer grid values (as floats) when on a symmetric integer grid
    scale: jax.Array | None          # compact scale (ndim of the operand) matching ``ints``
    grad: jax.Array                  # the operand the integer contraction's backward pass differentiates at


def _quantize_operand(x: jax.Array, spec: _spec.Format | None, static: Scale | None, path: str,
                      gradient: Gradient) -> _Operand:
    if spec is None:
        return _Operand(x, None, None, x)
    if not isinstance(spec, _spec.QuantSpec):
        scale, zp = (None, None) if static is None else static
        value = spec.fake_quant(x, scale, zp, path=path)
        return _Operand(value, None, None, value)
    if static is None:
        scale, zp = jax.lax.stop_gradient(spec.calibrate(x, path=path))
    else:
        scale, zp = static
        scale = jnp.reshape(scale, (1,) * (x.ndim - jnp.ndim(scale)) + jnp.shape(scale))
        zp = None if zp is None else jnp.reshape(zp, scale.shape)
    s = expand(scale, x.shape)
    z = None if zp is None else expand(zp, x.shape)
    xf = x.astype(jnp.float32)
    own_range = static is None and z is None and isinstance(spec.calibration, _spec.AbsMax)
    # With the tensor's own absmax as range, |x / s| <= qmax up to rounding: nothing to clip or mask.
    q = to_int(xf, spec, s, z, clip=not own_range)
    if own_range:
        inside = None
    else:
        lo, hi = (spec.qmin * s, spec.qmax * s) if z is None else ((spec.qmin - z) * s, (spec.qmax - z) * s)
        inside = (xf >= lo) & (xf <= hi)
    value = ste(xf, from_int(q, s, z), inside).astype(x.dtype)
    if gradient is Gradient.QUANTIZED:
        grad = value
    else:  # the float operand itself (no copy: XLA keeps x + (x - x) as written), masked where clipped
        grad = x if inside is None else ste(xf, jax.lax.stop_gradient(xf), inside).astype(x.dtype)
    return _Operand(value, q if zp is None else None, scale if zp is None else None, grad)


def _after(q: QArray, x: jax.Array) -> QArray:
    """``q`` with a data dependency on ``x`` (its values and scale plus an exact zero computed from ``x``).

    Unpacking a kernel depends only on the parameters, so XLA may schedule every layer's unpacking at
    the start of the program (XLA:CPU's concurrency-optimized scheduler does, and it drops
    ``optimization_barrier``), holding a float copy of all weights at once. Made to wait for the
    layer's input, each float copy lives only around its own matmul. ``isnan(.) * 0`` is zero for
    every input, NaN included, and XLA does not fold a float multiplication by zero.
    """
    zero = jnp.isnan(x.reshape(-1)[0]).astype(jnp.float32) * 0.0
    return dataclasses.replace(q, values=q.values + zero.astype(q.values.dtype),
                               scale=q.scale + zero.astype(q.scale.dtype))


def _from_qarray(q: QArray) -> _Operand:
    ints = q.int_values().astype(jnp.float32) if q.zero_point is None else None
    value = q.dense()
    return _Operand(value, ints, q.scale if ints is not None else None, value)


def _with_grad_of(op: Callable, a: jax.Array, b: jax.Array, y: jax.Array) -> jax.Array:
    """``y`` forward; backward as ``op(a, b)`` (straight-through over the integer computation)."""
    @jax.custom_vjp
    def f(a, b, y):
        return y

    def fwd(a, b, y):
        return y, (a, b)

    def bwd(res, g):
        _, vjp = jax.vjp(op, *res)
        return (*vjp(g.astype(y.dtype)), jnp.zeros_like(g))

    f.defvjp(fwd, bwd)
    return f(a, b, y)


def _dot_out_scale(dn, x: _Operand, w: _Operand, x_ndim: int, w_ndim: int) -> jax.Array | None:
    """Output scale of ``dot_general`` if both scales are constant along the contraction, else None."""
    (lc, rc), (lb, rb) = dn
    if lb or rb or w.scale is None:
        return None
    sx = jnp.ones((1,) * x_ndim) if x.scale is None else x.scale
    sw = w.scale
    if any(sx.shape[d] != 1 for d in lc) or any(sw.shape[d] != 1 for d in rc):
        return None
    x_free = [d for d in range(x_ndim) if d not in lc]
    w_free = [d for d in range(w_ndim) if d not in rc]
    sx = sx.reshape([sx.shape[d] for d in x_free] + [1] * len(w_free))
    sw = sw.reshape([1] * len(x_free) + [sw.shape[d] for d in w_free])
    return sx * sw


def _conv_out_scale(dn, x: _Operand, w: _Operand, x_ndim: int, w_ndim: int) -> jax.Array | None:
    """Output scale of a convolution if the input scale is per-tensor and the kernel's per output channel."""
    if w.scale is None or dn.rhs_spec[0] != w_ndim - 1 or dn.out_spec[1] != x_ndim - 1:
        return None
    sx = jnp.ones(()) if x.scale is None else x.scale
    if sx.size != 1 or any(n != 1 for n in w.scale.shape[:-1]):
        return None
    return sx.reshape(()) * w.scale.reshape(-1)


def _contract(op: Callable, x: _Operand, w: _Operand, out_scale: jax.Array | None,
              preferred: Any) -> jax.Array:
    float_op = functools.partial(op, preferred_element_type=preferred)
    if w.ints is None or out_scale is None:
        return float_op(x.value, w.value)
    if x.ints is not None:  # weights and activations: int8 x int8 -> int32
        acc = op(x.ints.astype(jnp.int8), w.ints.astype(jnp.int8), preferred_element_type=jnp.int32)
    else:  # weight-only: integer weights in the matmul, dequantized by the output rescale
        acc = op(x.value, w.ints.astype(x.value.dtype), preferred_element_type=preferred)
    y = (acc.astype(jnp.float32) * out_scale).astype(jnp.result_type(x.value, w.value))
    return _with_grad_of(float_op, x.grad, w.grad, y)


class _Proxy:
    """An nnx layer seen with some attributes replaced, without mutating it (it may be under a trace)."""

    def __init__(self, module: Any, attrs: Mapping[str, Any]):
        self._module, self._attrs = module, attrs

    def __getattr__(self, name: str) -> Any:
        return self._attrs[name] if name in self._attrs else getattr(self._module, name)


def _run(call: _intercept.Call, params: dict, inputs: jax.Array, **attrs: Any) -> jax.Array:
    """The layer's own computation on ``params``/``inputs`` with some attributes replaced."""
    if isinstance(call.module, nnx.Module):
        over = {**attrs, **{k: nnx.Param(v) for k, v in params.items()}}
        # Any: the layer's own __call__ runs unbound on a _Proxy that stands in for the layer.
        base: Any = next(c for c in type(call.module).__mro__ if c in _intercept.NNX_LAYERS)
        return base.__call__(_Proxy(call.module, over), inputs, *call._args[1:], **call._kwargs)
    return call.run(params, inputs, **attrs)


def qat(fn: Any, *, weights: _spec.Format | Sequence[_tree.Rule[_spec.Format | None]] | None = None,
        activations: _spec.Format | Sequence[_tree.Rule[_spec.Format | None]] | None = None,
        scales: Mapping[str, Scale] | None = None,
        where: str | Sequence[str] | Callable | None = None, gradient: Gradient = Gradient.QUANTIZED) -> Callable:
    """Runs the selected layers of ``fn`` on quantized weights and inputs.

    Args:
      fn: a linen apply function (``model.apply`` or a function calling it) or an nnx module.
      weights: kernel format (e.g. ``QuantSpec(bits=8, granularity=PER_CHANNEL)``), or rules
        ``[jb.tree.Rule(regex, format or None), ...]`` matched against each called layer's kernel
        path ``<module path>/kernel`` as in :mod:`jaxopt_big.tree` (so the rules given to
        ``quantize_params`` on the params collection apply unchanged; first match wins; a rule that
        claims no called layer raises).
        Kernels that already are :class:`QArray` leaves (from ``quantize_params``) run as stored.
      activations: input format; ``PER_TOKEN`` gives dynamic per-token scales. None: float inputs
        (weight-only quantization). Or rules matched against ``<module path>/inputs``, as ``weights``.
      scales: static input scales from :func:`calibrate_activations` (PTQ); None: dynamic scales
        calibrated on each call.
      where: module-path selection of the layers (None: every Dense/Conv/Einsum layer).
      gradient: where integer contractions take their straight-through gradient:
        ``Gradient.QUANTIZED`` (at the fake-quantized operands) or ``Gradient.FLOAT`` (at the float
        operands, as qwix does; float fallbacks keep the quantized-operand gradient).

    Returns:
      A function with ``fn``'s signature. Forward values are fake-quant numerics (computed with
      integer matmuls where the scales allow), gradients straight-through.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> model = nn.Dense(4)
      >>> x = jax.random.normal(jax.random.key(1), (2, 8))
      >>> v = model.init(jax.random.key(0), x)
      >>> f = qat(model.apply, weights=QuantSpec(granularity=PER_CHANNEL), activations=QuantSpec())
      >>> bool(jnp.abs(f(v, x) - model.apply(v, x)).max() < 0.05)
      True
    """
    if activations is not None and not isinstance(activations, _spec.Format) and not _tree.is_rules(activations):
        raise TypeError(f"activations must be a QuantSpec/Format, rules or None, got {activations!r}")
    if scales is not None and activations is None:
        raise ValueError("static activation scales were given but activations=None")
    if not isinstance(gradient, Gradient):
        raise TypeError(f"gradient must be Gradient.QUANTIZED or Gradient.FLOAT, got {gradient!r}")

    def wrapped(*args, **kwargs):
        rules = _tree.PathRules(weights, what="weights")
        act_rules = _tree.PathRules(activations, what="activations")

        def impl(call: _intercept.Call) -> Any:
            kernel = call.kernel
            wspec = rules(f"{call.path}/kernel")
            if wspec is not None and not isinstance(wspec, _spec.Format):
                raise TypeError(f"{call.path}/kernel: weights must be a QuantSpec/Format or None, got {wspec!r}")
            aspec = act_rules(f"{call.path}/inputs")
            if aspec is not None and not isinstance(aspec, _spec.Format):
                raise TypeError(f"{call.path}/inputs: activations must be a QuantSpec/Format or None, got {aspec!r}")
            if kernel is None or (wspec is None and aspec is None and not isinstance(kernel, QArray)):
                return NotImplemented
            static = None
            if scales is not None and aspec is not None:
                if call.path not in scales:
                    raise ValueError(f"{call.path}: no static activation scale; scales has {sorted(scales)}")
                static = scales[call.path]
            if isinstance(kernel, QArray):
                w = _from_qarray(_after(kernel, call.inputs))
            else:
                w = _quantize_operand(kernel, wspec, None, f"{call.path}/kernel", gradient)
            x = _quantize_operand(call.inputs, aspec, static, f"{call.path}/inputs", gradient)
            params = {**call.params, "kernel": w.value}
            lax_op: Callable[..., jax.Array]
            if isinstance(call.module, _DOT_LAYERS):
                attr, out_scale_fn, lax_op = "dot_general", _dot_out_scale, lax.dot_general
            elif isinstance(call.module, _CONV_LAYERS):
                attr, out_scale_fn, lax_op = "conv_general_dilated", _conv_out_scale, lax.conv_general_dilated
            else:  # Einsum and other layers: float contraction on fake-quantized operands
                return _run(call, params, x.value)

            def contraction(lhs, rhs, *op_args, preferred_element_type=None, **op_kw):
                op = lambda a, b, **kw: lax_op(a, b, *op_args, **op_kw, **kw)
                out_scale = None
                # The layer may have padded or reshaped its operands; then the integer values do not line up.
                if (w.ints is not None and rhs.shape == w.ints.shape
                        and (x.ints is None or lhs.shape == x.ints.shape)):
                    dn = (op_args[0] if op_args else op_kw["dimension_numbers"]) if attr == "dot_general" else \
                        lax.conv_dimension_numbers(
                        lhs.shape, rhs.shape, op_kw.get("dimension_numbers"))
                    out_scale = out_scale_fn(dn, x, w, lhs.ndim, rhs.ndim)
                # Float-operand gradients only where the integer path runs: the operands line up there.
                float_grad = gradient is Gradient.FLOAT and out_scale is not None
                x_grad = x.grad if float_grad and x.ints is not None else lhs
                w_grad = w.grad if float_grad else rhs
                return _contract(op, x._replace(value=lhs, grad=x_grad), w._replace(value=rhs, grad=w_grad),
                                 out_scale, preferred_element_type)

            # The layer sees the fake-quant operands (shapes, promotion, bias); the contraction swaps in
            # the integer computation where the scales allow it.
            return _run(call, params, x.value, **{attr: contraction})

        out = _intercept.replace(fn, where, impl)(*args, **kwargs)
        rules.check()
        act_rules.check()
        return out

    return wrapped

