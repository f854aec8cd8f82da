"""Learned step size quantization: LSQ (Esser et al., 2020) and LSQ+ offsets (Bhalgat et al., 2020).

The step ``s`` (per tensor or per channel) is a parameter trained by optax next to the weights:

    v = clip((w - beta) / s, qmin, qmax);   w_q = round(v) * s + beta      (beta = 0 for symmetric grids)

with a straight-through round. The step's gradient is ``round(v) - v`` inside the range and
``qmin``/``qmax`` at the clip, scaled by ``g = 1 / sqrt(N * qmax)`` (``N`` weights per step); the
LSQ+ offset ``beta`` gets 0 inside and 1 at the clip, scaled alike. As in :func:`fake_quant`, a
weight is clipped only if ``v`` lies beyond ``[qmin, qmax]`` by more than rounding (half a step):
the weights at the ends of the range the step was calibrated on keep their gradient.

:func:`lsq` wraps the selected weights into :class:`Learned` leaves (weight, step, offset: all
float arrays, so any optax transform trains them); ``jb.leaves.densify`` gives the fake-quantized
weights for the forward pass; :func:`lsq_export` turns the trained leaves into packed ``QArray``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.quant import _spec
from jaxopt_big.quant._calibrate import check_grid, check_input, expand, group_size, unclipped

__all__ = ["LSQ", "Learned", "lsq", "lsq_export"]


def _scale_grad(x: jax.Array, g: float) -> jax.Array:
    """``x`` forward, gradient multiplied by ``g``."""
    return jax.lax.stop_gradient(x - x * g) + x * g


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSQ(_spec.Format):
    """A learned-step integer grid: the grid, granularity and initial calibrator of ``spec``.

    As a :class:`~jaxopt_big.quant._spec.Format`, ``calibrate`` gives the initial
    ``(step, offset)`` (offset None for symmetric grids; for affine ones the LSQ+ offset ``beta``
    in weight units, ``-zero_point * step``), ``fake_quant(x, step, offset)`` is differentiable in
    all three, and ``quantize`` stores a :class:`~jaxopt_big.quant._qarray.QArray`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt_big.quant._spec import QuantSpec
      >>> f = LSQ(spec=QuantSpec(bits=2))
      >>> x = jnp.array([0.3, 0.8, -2.0, 0.6])
      >>> f.fake_quant(x, jnp.array(1.0)).tolist()
      [0.0, 1.0, -1.0, 1.0]
      >>> jax.grad(lambda s: f.fake_quant(x, s).sum())(jnp.array(1.0)).round(3).tolist()  # (-.3+.2-1+.4)/sqrt(4)
      -0.35
    """

    spec: _spec.QuantSpec = _spec.QuantSpec(bits=4)

    def __post_init__(self):
        if not isinstance(self.spec, _spec.QuantSpec):
            raise TypeError(f"LSQ.spec must be a QuantSpec, got {self.spec!r}")
        if isinstance(self.spec.granularity, _spec.PerToken):
            raise ValueError(f"LSQ learns static steps; PER_TOKEN scales are dynamic, got {self.spec!r}")

    def calibrate(self, x, *, path=""):
        scale, zero_point = self.spec.calibrate(x, path=path)
        return scale, None if zero_point is None else -zero_point * scale

    def fake_quant(self, x, scale=None, zero_point=None, *, path=""):
        x = check_input(x, path)
        if scale is None:
            scale, zero_point = jax.lax.stop_gradient(self.calibrate(x, path=path))
        else:
            scale, zero_point = check_grid(scale, zero_point, path)
        if self.spec.symmetric != (zero_point is None):
            raise ValueError(f"{path + ': ' if path else ''}LSQ offset must be "
                             f"{'None for a symmetric' if self.spec.symmetric else 'given for an affine'} grid, "
                             f"got {zero_point!r}")
        g = 1.0 / np.sqrt(x.size / max(scale.size, 1) * self.spec.qmax)
        group = group_size(x.shape, self.spec)
        s = expand(_scale_grad(scale, g), x.shape, group)
        beta = 0.0 if zero_point is None else expand(_scale_grad(zero_point, g), x.shape, group)
        v = (x.astype(jnp.float32) - beta) / s
        qmin, qmax = self.spec.qmin, self.spec.qmax
        v = jnp.where(unclipped(v, self.spec), v, jnp.clip(v, qmin, qmax))  # clipped: constant in x
        v = v + jax.lax.stop_gradient(jnp.clip(jnp.round(v), qmin, qmax) - v)
        return (v * s + beta).astype(x.dtype)

    def quantize(self, x, scale=None, zero_point=None, *, path=""):
        if scale is None:
            scale, zero_point = self.calibrate(check_input(x, path), path=path)
        else:
            scale, zero_point = check_grid(scale, zero_point, path)
        if zero_point is None:
            return self.spec.quantize(x, scale, path=path)
        # QArray's zero point is in grid units: beta = -zero_point * step (need not be an integer).
        zp = -jnp.asarray(zero_point, jnp.float32) / scale
        group = group_size(x.shape, self.spec)
        codes = jnp.clip(jnp.round(x.astype(jnp.float32) / expand(scale, x.shape, group)
                                   + expand(zp, x.shape, group)),
                         self.spec.qmin, self.spec.qmax)
        # The codes are integers already: store them with a unit scale, then attach the learned grid.
        q = self.spec.quantize(codes.astype(x.dtype), jnp.ones_like(scale), jnp.zeros_like(scale), path=path)
        return q.replace(scale=scale.reshape(q.scale.shape), zero_point=zp.reshape(q.scale.shape))


@flax.struct.dataclass
class Learned(_leaves.Compressed):
    """A weight in training with its learned step (and LSQ+ offset); ``dense()`` is the fake-quantized weight.

    All three are float leaves, so optax trains them together; ``nbytes`` counts what is stored
    during training (the float weight and the step).
    """

    weight: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    format: LSQ = flax.struct.field(pytree_node=False)
    path: str = flax.struct.field(pytree_node=False, default="")

    def dense(self) -> jax.Array:
        return self.format.fake_quant(self.weight, self.scale, self.offset, path=self.path)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.weight, self.scale, self.offset))

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dense_dtype(self) -> Any:
        return self.weight.dtype

    @property
    def kind(self) -> str:
        return f"lsq int{self.format.spec.bits} (training)"

    def export(self) -> Any:
        """The packed :class:`~jaxopt_big.quant._qarray.QArray` with the learned grid."""
        return self.format.quantize(self.weight, self.scale, self.offset, path=self.path)


def lsq(params: Any, spec: LSQ | _spec.QuantSpec | Sequence[_tree.Rule], *,
        where: _tree.Where = _tree.KERNELS) -> Any:
    """Wraps the selected weights into :class:`Learned` leaves with steps initialised by the calibrator.

    Train the result with any optax transform (the weights, steps and offsets are float leaves),
    using ``jb.leaves.densify(tree)`` as the model's parameters in the loss; then call
    :func:`lsq_export`.

    Args:
      params: parameter pytree.
      spec: an :class:`LSQ` (a ``QuantSpec`` is wrapped as ``LSQ(spec=...)``), or rules
        ``[jb.tree.Rule(regex, spec or None), ...]`` among the selected leaves (first match wins;
        unclaimed leaves stay as they are).
      where: which leaves to wrap (default: float kernels; compressed leaves stay as they are, and
        selecting one raises ValueError).

    Examples:
      >>> import jax.numpy as jnp, jaxopt_big as jb
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> t = lsq({"d": {"kernel": jnp.array([[0.5, -1.0], [1.0, 2.0]])}}, QuantSpec(bits=4, granularity=PER_CHANNEL))
      >>> (t["d"]["kernel"].scale * 7).tolist(), type(lsq_export(t)["d"]["kernel"]).__name__
      ([[1.0, 2.0]], 'QArray')
    """
    def wrap(path, w, fmt):
        fmt = LSQ(spec=fmt) if isinstance(fmt, _spec.QuantSpec) else fmt
        if not isinstance(fmt, LSQ):
            raise TypeError(f"{path}: lsq needs an LSQ or QuantSpec, got {fmt!r}")
        scale, offset = fmt.calibrate(w, path=path)
        return _leaves.place_like(Learned(weight=w, scale=scale, offset=offset, format=fmt, path=path), w)

    return _tree.map_float_kernels(wrap, params, spec, where, purpose="to quantize", what="spec")


def lsq_export(tree: Any) -> Any:
    """Replaces every :class:`Learned` leaf by its packed ``QArray``; other leaves pass through.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxopt_big.quant._spec import QuantSpec
      >>> t = lsq({"k": {"kernel": jnp.array([[0.3, -1.0]])}}, QuantSpec(bits=2))
      >>> lsq_export(t)["k"]["kernel"].dense().tolist()
      [[0.0, -1.0]]
    """
    return _leaves.map(lambda x: x.export() if isinstance(x, Learned) else x, tree)
