"""Quantized execution of Dense/DenseGeneral/Conv/Einsum layers (linen) and Linear/Conv (nnx).

`qat` wraps an apply function (or nnx module) through :func:`jaxopt_big.intercept.replace`. Each
selected layer runs its own computation with its kernel given as an execution hook (see
:mod:`jaxopt_big.leaves`), so ``intercept`` hands the contraction to a quantized one:

* weights and activations on symmetric integer grids whose scales are constant along the
  contraction run as a real ``int8 x int8 -> int32`` ``dot_general`` / convolution, then one rescale;
* weight-only quantization multiplies by the integer weights and rescales the output (the
  dequantization happens inside the matmul);
* kernels that already are compressed leaves run on their own hook: a stored ``QArray`` (packed
  int4/int2 too) takes the two integer paths above, a ``LowRank`` runs as ``x @ u @ v``;
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.quant import _spec
from jaxopt_big.quant._calibrate import expand, from_int, to_int, unclipped
from jaxopt_big.quant._fake import ste
from jaxopt_big.quant._ptq import Scale
from jaxopt_big.quant._qarray import integer_contract

__all__ = ["qat", "Gradient"]


class Gradient(enum.Enum):
    """Where the straight-through backward pass of an integer contraction takes its gradient."""

    QUANTIZED = "quantized"  # at the fake-quantized operands: the classic fake-quant STE
    FLOAT = "float"          # at the float operands (qwix's QAT): cheaper, exact only as bits grow



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
        inside = unclipped(xf / s if z is None else xf / s + z, spec)
    value = ste(xf, from_int(q, s, z), inside).astype(x.dtype)
    if gradient is Gradient.QUANTIZED:
        grad = value
    else:  # the float operand itself (no copy: XLA keeps x + (x - x) as written), masked where clipped
        grad = x if inside is None else ste(xf, jax.lax.stop_gradient(xf), inside).astype(x.dtype)
    return _Operand(value, q if zp is None else None, scale if zp is None else None, grad)


def _after(leaf: Any, x: jax.Array) -> Any:
    """``leaf`` with a data dependency on ``x`` (every array plus an exact zero computed from ``x``).

    Unpacking a kernel depends only on the parameters, so XLA may schedule every layer's unpacking at
    the start of the program (XLA:CPU's concurrency-optimized scheduler does, and it drops
    ``optimization_barrier``), holding a float copy of all weights at once. Made to wait for the
    layer's input, each float copy lives only around its own matmul. ``isnan(.) * 0`` is zero for
    every input, NaN included, and XLA does not fold a float multiplication by zero.
    """
    zero = jnp.isnan(x.reshape(-1)[0]).astype(jnp.float32) * 0.0
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), leaf)


class _Kernel(NamedTuple):
    """A layer's kernel under QAT, as its contraction sees it: an execution hook for ``intercept``.

    ``stored`` is a compressed kernel (it runs on its own hook, e.g. a ``QArray``'s integer matmul);
    else ``w`` is the quantized float kernel. ``x`` is the quantized layer input.
    """

    stored: Any
    w: _Operand | None
    x: _Operand
    gradient: Gradient

    def _kernel(self) -> Any:
        if self.stored is not None:
            return self.stored
        assert self.w is not None  # a _Kernel holds ``stored`` or ``w``
        return self.w.value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._kernel().shape)

    @property
    def dtype(self) -> Any:
        return self._kernel().dtype

    def contract(self, lhs: jax.Array, c: _leaves.Contraction) -> jax.Array:
        x, w = self.x, self.w
        # The layer may have padded or reshaped its input; then the integer values do not line up.
        fits = False
        if x.ints is not None and x.scale is not None and lhs.shape == x.ints.shape:
            fits = True
            c = dataclasses.replace(c, int_input=(x.ints, x.scale))
        if self.stored is not None:
            return _leaves.contract(self.stored, lhs, c)
        assert w is not None  # a _Kernel holds ``stored`` or ``w``
        y = None if w.ints is None or w.scale is None else integer_contract(c, lhs, w.ints, w.scale)
        if y is None:  # float contraction on the fake-quantized operands
            return c(lhs, w.value)
        # Float-operand gradients only where the integer path runs: the operands line up there.
        float_grad = self.gradient is Gradient.FLOAT
        return c.straight_through(x.grad if float_grad and fits else lhs, w.grad if float_grad else w.value, y)


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
        Kernels that already are compressed leaves (``QArray`` from ``quantize_params``, ...) run as
        stored, through their execution hook.
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
            if kernel is None or (wspec is None and aspec is None and not _leaves.is_compressed(kernel)):
                return NotImplemented
            static = None
            if scales is not None and aspec is not None:
                if call.path not in scales:
                    raise ValueError(f"{call.path}: no static activation scale; scales has {sorted(scales)}")
                static = scales[call.path]
            x = _quantize_operand(call.inputs, aspec, static, f"{call.path}/inputs", gradient)
            if _leaves.is_compressed(kernel):  # runs as stored, on its own hook
                hook = _Kernel(_after(kernel, call.inputs), None, x, gradient)
            else:
                w_op = _quantize_operand(kernel, wspec, None, f"{call.path}/kernel", gradient)
                hook = _Kernel(None, w_op, x, gradient)
            if not call.runs_hooks:  # Einsum and other layers: float contraction on fake-quantized operands
                return call.run({**call.params, "kernel": hook.stored if hook.w is None else hook.w.value}, x.value)
            # The layer sees the fake-quant input (shapes, promotion, bias); its contraction goes to the hook,
            # which swaps in the integer computation where the scales allow it.
            return call.run({**call.params, "kernel": hook}, x.value)

        out = _intercept.replace(fn, where, impl)(*args, **kwargs)
        rules.check()
        act_rules.check()
        return out

    return wrapped

