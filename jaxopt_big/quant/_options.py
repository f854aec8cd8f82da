"""The small typed options of number formats: granularity, calibration, and the `Format` protocol.

They sit below everything else in :mod:`jaxopt_big.quant`: the modules that implement the integer
grid (``_calibrate``, ``_fake``, ``_qarray``) read them, and :class:`~jaxopt_big.quant.QuantSpec`
(in ``_spec``) composes those implementations, so no module imports one that imports it back.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Protocol

import jax
from jax.typing import ArrayLike

from jaxopt_big import _checks

__all__ = ["Format", "IntegerGrid", "PerTensor", "PerChannel", "PerToken", "Group", "PER_TENSOR", "PER_CHANNEL",
           "PER_TOKEN", "AbsMax", "MinMax", "Percentile", "MSE", "Granularity", "Calibration"]


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
    An axis no longer than ``size`` is one group (as GPTQ's reference groups a narrow layer), and a
    ``size`` that does not divide the axis leaves a shorter last group (``Group(128)`` on 176 inputs:
    128 and 48), so one spec such as ``Group(128)`` fits every layer of a real checkpoint.

    Examples:
      >>> Group(128).span(64), Group(128).span(512)
      (64, 128)
    """

    size: int
    along: int = -2

    def __post_init__(self):
        _checks.store(self, size=_checks.integer("Group.size", self.size, low=1),
                      along=_checks.integer("Group.along", self.along))

    def span(self, n: int) -> int:
        """The entries per group on an axis of length ``n``."""
        return min(self.size, n)


PER_TENSOR = PerTensor()
PER_CHANNEL = PerChannel()
PER_TOKEN = PerToken()
Granularity = PerTensor | PerChannel | PerToken | Group


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbsMax:
    """Range from the largest magnitude (symmetric) or ``[-absmax, absmax]`` (affine).

    The default calibration of symmetric grids (``QuantSpec(symmetric=True)``).
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMax:
    """Range ``[min(x, 0), max(x, 0)]`` (affine); the same as AbsMax for symmetric grids.

    The default calibration of affine grids (``QuantSpec(symmetric=False)``), as in GPTQ's reference.
    """


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Range clipped at the ``q``-th percentile of ``|x|`` (symmetric) or of ``x`` and ``-x`` (affine)."""

    q: float

    def __post_init__(self):
        _checks.store(self, q=_checks.number("Percentile.q", self.q, above=0, high=100))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSE:
    """Searches clipping ratios in ``[min_ratio, 1]`` of the absmax/min-max range; keeps, per scale,
    the grid and ratio with the least squared reconstruction error.

    On grids holding all ``2^b`` codes it tries, per ratio, both ways of placing ``±absmax``: at the
    narrow code ``±(2^(b-1)-1)`` and at the extra code ``-2^(b-1)``; affine grids also try every
    symmetric candidate (zero point 0), so an affine search is never worse than a symmetric one.

    The least *weight* error is not always the least task error at 2-3 bits: inputs with a non-zero
    mean (pixels, ReLU outputs) turn each output channel's summed weight error into a shift of its
    pre-activation, which the weight error does not see, and grids that give the two signs unequal
    codes (full range, affine) tend to leave larger sums. Calibration data sees it: GPTQ's Hessian
    ``X^T X`` holds the input mean (``benchmarks/quant_lowbit.py`` measures both).
    """

    steps: int = 64
    min_ratio: float = 0.1

    def __post_init__(self):
        _checks.store(self, steps=_checks.integer("MSE.steps", self.steps, low=1),
                      min_ratio=_checks.fraction("MSE.min_ratio", self.min_ratio, closed=True, open_low=True))


Calibration = AbsMax | MinMax | Percentile | MSE


class Format(abc.ABC):
    """What a number format offers; usable wherever a ``QuantSpec`` is accepted.

    Implementations are frozen dataclasses. ``path`` names the leaf in error messages. Arguments are
    array-likes (the public ``calibrate``/``fake_quant``/``quantize`` pass the caller's values through).
    """

    @abc.abstractmethod
    def calibrate(self, x: ArrayLike, *, path: str = "") -> tuple[jax.Array, jax.Array | None]:
        """``(scale, zero_point)`` for ``x``; ``zero_point`` is None for symmetric formats."""

    @abc.abstractmethod
    def fake_quant(self, x: ArrayLike, scale: ArrayLike | None = None, zero_point: ArrayLike | None = None,
                   *, path: str = "") -> jax.Array:
        """Quantize-dequantize in ``x.dtype``, with straight-through gradients."""

    @abc.abstractmethod
    def quantize(self, x: ArrayLike, scale: ArrayLike | None = None, zero_point: ArrayLike | None = None,
                 *, path: str = "") -> Any:
        """A compressed leaf (:class:`jaxopt_big.leaves.Compressed`) standing for ``x``."""


class IntegerGrid(Protocol):
    """What the integer-grid arithmetic reads of a spec (:class:`~jaxopt_big.quant.QuantSpec` has it).

    Read-only properties, so a frozen dataclass satisfies it.
    """

    @property
    def bits(self) -> int: ...

    @property
    def symmetric(self) -> bool: ...

    @property
    def granularity(self) -> Granularity: ...

    @property
    def axis(self) -> int: ...

    @property
    def calibration(self) -> Calibration | None: ...  # never None once a QuantSpec is built

    @property
    def full_range(self) -> bool: ...

    @property
    def qmin(self) -> int: ...

    @property
    def qmax(self) -> int: ...
