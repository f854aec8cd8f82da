"""Typed quantization options: the integer grid (`QuantSpec`), granularity and calibration.

`Format` is the small protocol every number format follows (integer grids here; binary, ternary,
float8 and learned-step formats elsewhere in :mod:`jaxopt_big.quant`): anything that accepts a
``QuantSpec`` accepts any ``Format``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax

from jaxopt_big import _checks

__all__ = ["Format", "QuantSpec", "PerTensor", "PerChannel", "PerToken", "Group", "PER_TENSOR", "PER_CHANNEL",
           "PER_TOKEN",
           "AbsMax", "MinMax", "Percentile", "MSE", "Granularity", "Calibration"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerChannel:
    """One scale per index of ``QuantSpec.axis``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerToken:
    """One scale per vector along the last axis (per token of an activation; reduces only that axis)."""


@dataclasses.dataclass(frozen=True)
class Group:
    """One scale per channel (``QuantSpec.axis``) and per block of ``size`` consecutive entries along ``along``.

    ``along`` defaults to -2, the input axis of a Dense ``(in, out)`` or Conv ``(..., in, out)`` kernel.
    """

    size: int
    along: int = -2

    def __post_init__(self):
        object.__setattr__(self, "size", _checks.integer("Group.size", self.size, low=1))
        object.__setattr__(self, "along", _checks.integer("Group.along", self.along))


PER_TENSOR = PerTensor()
PER_CHANNEL = PerChannel()
PER_TOKEN = PerToken()
Granularity = PerTensor | PerChannel | PerToken | Group


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbsMax:
    """Range from the largest magnitude (symmetric) or ``[-absmax, absmax]`` (affine)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMax:
    """Range ``[min(x, 0), max(x, 0)]`` (affine); the same as AbsMax for symmetric grids."""


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Range clipped at the ``q``-th percentile of ``|x|`` (symmetric) or of ``x`` and ``-x`` (affine)."""

    q: float

    def __post_init__(self):
        object.__setattr__(self, "q", _checks.number("Percentile.q", self.q, above=0, high=100))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSE:
    """Searches clipping ratios in ``[min_ratio, 1]`` of the absmax/min-max range; keeps, per scale,
    the ratio with the least squared reconstruction error."""

    steps: int = 64
    min_ratio: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "steps", _checks.integer("MSE.steps", self.steps, low=1))
        object.__setattr__(self, "min_ratio", _checks.fraction("MSE.min_ratio", self.min_ratio, closed=True, open_low=True))


Calibration = AbsMax | MinMax | Percentile | MSE


class Format(abc.ABC):
    """What a number format offers; usable wherever a ``QuantSpec`` is accepted.

    Implementations are frozen dataclasses. ``path`` names the leaf in error messages.
    """

    @abc.abstractmethod
    def calibrate(self, x: jax.Array, *, path: str = "") -> tuple[jax.Array, jax.Array | None]:
        """``(scale, zero_point)`` for ``x``; ``zero_point`` is None for symmetric formats."""

    @abc.abstractmethod
    def fake_quant(self, x: jax.Array, scale: jax.Array | None = None, zero_point: jax.Array | None = None,
                   *, path: str = "") -> jax.Array:
        """Quantize-dequantize in ``x.dtype``, with straight-through gradients."""

    @abc.abstractmethod
    def quantize(self, x: jax.Array, scale: jax.Array | None = None, zero_point: jax.Array | None = None,
                 *, path: str = "") -> Any:
        """A compressed leaf (:class:`jaxopt_big.leaves.Compressed`) standing for ``x``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec(Format):
    """A uniform integer grid.

    Attributes:
      bits: 2..8. Symmetric grids use ``[-(2^(b-1)-1), 2^(b-1)-1]``; affine ones ``[-2^(b-1), 2^(b-1)-1]``
        with an integer zero point.
      symmetric: zero maps to integer 0 (no zero point) if True.
      granularity: ``PER_TENSOR``, ``PER_CHANNEL`` (one scale per index of ``axis``), ``PER_TOKEN`` (one
        scale per vector along the last axis, for dynamic activation scales) or ``Group(size)``.
      axis: channel axis for per-channel and per-group scales (-1: output features of a kernel).
      calibration: ``AbsMax()``, ``MinMax()``, ``Percentile(q)`` or ``MSE()``.

    Examples:
      >>> QuantSpec(bits=4, granularity=PER_CHANNEL).qmax
      7
      >>> QuantSpec(bits=9)
      Traceback (most recent call last):
      ...
      ValueError: QuantSpec.bits must be an int in [2, 8], got 9
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = PER_TENSOR
    axis: int = -1
    calibration: Calibration = AbsMax()

    def __post_init__(self):
        object.__setattr__(self, "bits", _checks.integer("QuantSpec.bits", self.bits, low=2, high=8))
        object.__setattr__(self, "symmetric", _checks.flag("QuantSpec.symmetric", self.symmetric))
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerToken, Group)):
            raise TypeError(f"QuantSpec.granularity must be PER_TENSOR, PER_CHANNEL, PER_TOKEN or Group(size), "
                            f"got {self.granularity!r}")
        object.__setattr__(self, "axis", _checks.integer("QuantSpec.axis", self.axis))
        if not isinstance(self.calibration, (AbsMax, MinMax, Percentile, MSE)):
            raise TypeError(f"QuantSpec.calibration must be AbsMax(), MinMax(), Percentile(q) or MSE(), "
                            f"got {self.calibration!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def calibrate(self, x, *, path=""):
        from jaxopt_big.quant._calibrate import integer_calibrate
        return integer_calibrate(x, self, path=path)

    def fake_quant(self, x, scale=None, zero_point=None, *, path=""):
        from jaxopt_big.quant._fake import integer_fake_quant
        return integer_fake_quant(x, self, scale, zero_point, path=path)

    def quantize(self, x, scale=None, zero_point=None, *, path=""):
        from jaxopt_big.quant._qarray import integer_quantize
        return integer_quantize(x, self, scale, zero_point, path=path)
