"""Sub-integer and float weight formats: binary, ternary and float8, with packed storage.

Each format is a :class:`~jaxopt_big.quant._spec.Format`, so it goes wherever a ``QuantSpec`` does
(``fake_quant``, ``quantize``, ``quantize_params``, ``fake_quant_params``, activation QAT):

- :class:`Binary`: ``sign(w) * mean|w|`` per channel; 1 bit per weight (:class:`SubByteArray`).
- :class:`Ternary`: TWN, ``{-a, 0, a}`` per channel with threshold ``0.7 * mean|w|``; 2 bits per
  weight (:class:`SubByteArray`).
- :class:`Float8`: e4m3 or e5m2 (``ml_dtypes``) with one per-tensor scale (:class:`Float8Array`).

Training goes through a straight-through estimator: the forward pass uses the format's value, the
gradient with respect to the weight is the identity (scales are data-derived and not differentiated).

Codes are stored by the one bit packer (:mod:`jaxopt_big._bits`): ``n`` codes of ``b`` bits really
take ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import _bits
from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big.quant import _spec
from jaxopt_big.quant._calibrate import check_input, expand
from jaxopt_big.quant._calibrate import nan_where_nonfinite
from jaxopt_big.quant._fake import ste

__all__ = ["Binary", "Ternary", "Float8", "F8", "SubByteArray", "Float8Array", "pack_bits", "unpack_bits"]


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Deprecated: ``jaxopt_big._bits.pack(codes.reshape(-1), bits)``, the one bit packer."""
    warnings.warn("jb.quant.pack_bits is deprecated; the one bit packer is jaxopt_big._bits.pack",
                  DeprecationWarning, stacklevel=2)
    return _bits.pack(jnp.asarray(codes).reshape(-1), bits)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Deprecated: ``jaxopt_big._bits.unpack(packed, bits, n)`` as ``int32``."""
    warnings.warn("jb.quant.unpack_bits is deprecated; the one bit packer is jaxopt_big._bits.unpack",
                  DeprecationWarning, stacklevel=2)
    return _bits.unpack(packed, bits, n).astype(jnp.int32)


def _where(path: str) -> str:
    return f"{path}: " if path else ""


def _reduce_axes(x: jax.Array, axis: int | None, path: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{_where(path)}axis={axis} is out of range for shape {x.shape}")
    return tuple(d for d in range(x.ndim) if d != axis % x.ndim)


def _check_axis(name: str, axis: Any) -> int | None:
    return None if axis is None else _checks.integer(f"{name}.axis (an int, or None per tensor)", axis)


def _no_zero_point(name: str, zero_point: Any, path: str) -> None:
    if zero_point is not None:
        raise ValueError(f"{_where(path)}{name} is symmetric and takes no zero point, got {zero_point!r}")


# Levels (-1, 1) for binary, (-1, 0, 1) for ternary: level = code * step - 1. Arithmetic, not a table
# gather, so the codes keep any explicit mesh axes (a gather from an unsharded table refuses them).
_STEP = {1: 2, 2: 1}


@flax.struct.dataclass
class SubByteArray(_leaves.Compressed):
    """Binary (1-bit) or ternary (2-bit) codes packed back to back, and a float32 scale.

    ``dense = levels[code] * scale`` with levels ``(-1, 1)`` for 1 bit and ``(-1, 0, 1)`` for 2 bits.
    The codes of the whole tensor are packed as one bit stream, so the bytes are
    ``ceil(size * bits / 8)`` plus the scales.

    Examples:
      >>> import jax.numpy as jnp
      >>> b = Binary().quantize(jnp.array([[1.0, -3.0], [-1.0, 1.0]]))
      >>> b.kind, b.dense().tolist(), b.nbytes
      ('binary', [[1.0, -2.0], [-1.0, 2.0]], 9)
    """

    codes: jax.Array
    scale: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    dense_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dense_dtype: Any = flax.struct.field(pytree_node=False)

    @classmethod
    def from_values(cls, values: jax.Array, scale: jax.Array, bits: int, dtype: Any) -> SubByteArray:
        """Packs ``values`` in ``{-1, 1}`` (bits=1) or ``{-1, 0, 1}`` (bits=2)."""
        codes = (values + 1) // _STEP[bits]
        return cls(codes=_bits.pack(codes.reshape(-1), bits), scale=scale.reshape(scale.shape or (1,) * values.ndim),
                   bits=bits, dense_shape=tuple(values.shape), dense_dtype=np.dtype(dtype))

    def dense(self) -> jax.Array:
        # The packed stream's mesh axes do not follow the weight's layout: unpack it whole.
        codes = _bits.unpack(_leaves.replicated(self.codes), self.bits, math.prod(self.dense_shape))
        codes = codes.reshape(self.dense_shape)
        levels = codes.astype(jnp.float32) * _STEP[self.bits] - 1
        return (levels * expand(self.scale, self.dense_shape)).astype(self.dense_dtype)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.codes, self.scale))



    @property
    def kind(self) -> str:
        return "binary" if self.bits == 1 else "ternary"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Binary(_spec.Format):
    """Binary weights ``sign(w) * mean|w|`` (XNOR-Net scaling), one scale per channel.

    Attributes:
      axis: channel axis with its own scale (-1: output features of a kernel); None for one
        scale per tensor.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.array([[0.5, -2.0], [-1.5, 1.0]])
      >>> Binary().fake_quant(w).tolist()
      [[1.0, -1.5], [-1.0, 1.5]]
      >>> jax.grad(lambda w: Binary().fake_quant(w).sum())(w).tolist()
      [[1.0, 1.0], [1.0, 1.0]]
    """

    axis: int | None = -1

    def __post_init__(self):
        _checks.store(self, axis=_check_axis("Binary", self.axis))

    def calibrate(self, x, *, path=""):
        x = check_input(x, path).astype(jnp.float32)
        axes = _reduce_axes(x, self.axis, path)
        return nan_where_nonfinite(jnp.mean(jnp.abs(x), axis=axes, keepdims=True), x, axes), None

    def _values(self, x, scale, zero_point, path):
        _no_zero_point("Binary", zero_point, path)
        x = check_input(x, path)
        if scale is None:
            scale = jax.lax.stop_gradient(self.calibrate(x, path=path)[0])
        return x, jnp.asarray(scale, jnp.float32), x >= 0

    def fake_quant(self, x, scale=None, zero_point=None, *, path=""):
        x, scale, plus = self._values(x, scale, zero_point, path)
        value = jnp.where(plus, 1.0, -1.0) * expand(scale, x.shape)
        return ste(x, jax.lax.stop_gradient(value.astype(x.dtype)))

    def quantize(self, x, scale=None, zero_point=None, *, path=""):
        x, scale, plus = self._values(x, scale, zero_point, path)
        return _leaves.place_like(SubByteArray.from_values(jnp.where(plus, 1, -1), scale, 1, x.dtype), x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ternary(_spec.Format):
    """Ternary weights (TWN): ``{-a, 0, a}`` per channel.

    Weights with ``|w| <= threshold * mean|w|`` become 0; ``a`` is the mean magnitude of the others.
    The stored form is a 2-bit :class:`SubByteArray`.

    Attributes:
      threshold: fraction of the channel's mean magnitude below which a weight is zero (TWN: 0.7).
      axis: channel axis (-1: output features), or None for one threshold and scale per tensor.

    Examples:
      >>> import jax.numpy as jnp
      >>> Ternary(axis=None).fake_quant(jnp.array([0.1, -2.0, 1.0, 0.5])).tolist()
      [0.0, -1.5, 1.5, 0.0]
    """

    threshold: float = 0.7
    axis: int | None = -1

    def __post_init__(self):
        _checks.store(self, axis=_check_axis("Ternary", self.axis),
                      threshold=_checks.number("Ternary.threshold", self.threshold, low=0))

    def _codes(self, x, path):
        axes = _reduce_axes(x, self.axis, path)
        mag = jnp.abs(x)
        keep = mag > self.threshold * jnp.mean(mag, axis=axes, keepdims=True)
        return jnp.sign(x) * keep, keep, axes

    def calibrate(self, x, *, path=""):
        x = check_input(x, path).astype(jnp.float32)
        _, keep, axes = self._codes(x, path)
        kept = jnp.sum(keep, axis=axes, keepdims=True)
        scale = jnp.sum(jnp.abs(x) * keep, axis=axes, keepdims=True) / jnp.maximum(kept, 1)
        return nan_where_nonfinite(scale, x, axes), None

    def _values(self, x, scale, zero_point, path):
        _no_zero_point("Ternary", zero_point, path)
        x = check_input(x, path)
        if scale is None:
            scale = jax.lax.stop_gradient(self.calibrate(x, path=path)[0])
        return x, jnp.asarray(scale, jnp.float32), jax.lax.stop_gradient(self._codes(x.astype(jnp.float32), path)[0])

    def fake_quant(self, x, scale=None, zero_point=None, *, path=""):
        x, scale, codes = self._values(x, scale, zero_point, path)
        return ste(x, jax.lax.stop_gradient((codes * expand(scale, x.shape)).astype(x.dtype)))

    def quantize(self, x, scale=None, zero_point=None, *, path=""):
        x, scale, codes = self._values(x, scale, zero_point, path)
        return _leaves.place_like(SubByteArray.from_values(codes.astype(jnp.int32), scale, 2, x.dtype), x)


class F8(enum.Enum):
    """float8 encodings (``ml_dtypes``): E4M3 (``float8_e4m3fn``, max 448) and E5M2 (max 57344)."""

    E4M3 = "e4m3"
    E5M2 = "e5m2"

    @property
    def dtype(self) -> Any:
        return jnp.float8_e4m3fn if self is F8.E4M3 else jnp.float8_e5m2


@flax.struct.dataclass
class Float8Array(_leaves.Compressed):
    """float8 values and a float32 per-tensor scale: ``dense = values * scale``."""

    values: jax.Array
    scale: jax.Array
    dense_dtype: Any = flax.struct.field(pytree_node=False)

    def dense(self) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(self.dense_dtype)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.values, self.scale))

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


    @property
    def kind(self) -> str:
        return f"float8 {np.dtype(self.values.dtype).name.removeprefix('float8_')}"


@dataclasses.dataclass(frozen=True)
class Float8(_spec.Format):
    """float8 casts with one per-tensor scale mapping ``absmax`` to the format's largest finite value.

    Attributes:
      format: ``F8.E4M3`` / ``"e4m3"`` (more precision) or ``F8.E5M2`` / ``"e5m2"`` (more range).

    Examples:
      >>> import jax.numpy as jnp
      >>> Float8("e4m3").fake_quant(jnp.array([448.0, 1.0, 0.3])).tolist()
      [448.0, 1.0, 0.3125]
      >>> Float8("e4m3").quantize(jnp.ones((4, 4))).nbytes
      20
      >>> Float8("e3m4")
      Traceback (most recent call last):
      ...
      ValueError: Float8.format must be one of ['e4m3', 'e5m2'], got 'e3m4'
    """

    format: F8 | str = F8.E4M3

    def __post_init__(self):
        try:
            _checks.store(self, format=F8(self.format))
        except ValueError:
            raise ValueError(f"Float8.format must be one of {[f.value for f in F8]}, got {self.format!r}") from None

    @property
    def max(self) -> float:
        return float(jnp.finfo(F8(self.format).dtype).max)  # __post_init__ made it an F8 already

    def calibrate(self, x, *, path=""):
        x = check_input(x, path)
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
        return nan_where_nonfinite(jnp.where(amax > 0, amax / self.max, 1.0), x), None

    def _cast(self, x, scale, zero_point, path):
        _no_zero_point("Float8", zero_point, path)
        x = check_input(x, path)
        if scale is None:
            scale = jax.lax.stop_gradient(self.calibrate(x, path=path)[0])
        scale = jnp.asarray(scale, jnp.float32)
        if scale.size != 1:
            raise ValueError(f"{_where(path)}Float8 uses one per-tensor scale, got scale of shape {scale.shape}")
        scale = scale.reshape(())
        return x, scale, jnp.clip(x.astype(jnp.float32) / scale, -self.max, self.max).astype(self.format.dtype)

    def fake_quant(self, x, scale=None, zero_point=None, *, path=""):
        x, scale, values = self._cast(x, scale, zero_point, path)
        value = values.astype(jnp.float32) * scale
        return ste(x, jax.lax.stop_gradient(value.astype(x.dtype)), jnp.abs(x) <= self.max * scale)

    def quantize(self, x, scale=None, zero_point=None, *, path=""):
        x, scale, values = self._cast(x, scale, zero_point, path)
        return _leaves.place_like(Float8Array(values=values, scale=scale, dense_dtype=np.dtype(x.dtype)), x)
