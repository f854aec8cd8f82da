"""`QuantSpec`: a uniform integer grid, the one `Format` defined by its options.

Its behaviour lives in the modules that implement integer grids (calibration in ``_calibrate``,
fake-quant in ``_fake``, packed storage in ``_qarray``); the options it is made of (granularity,
calibration, the `Format` protocol) live in ``_options``, which those modules read. Anything that
accepts a ``QuantSpec`` accepts any ``Format``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxopt_big import _checks
from jaxopt_big.quant._calibrate import check_grid, integer_calibrate
from jaxopt_big.quant._fake import integer_fake_quant
from jaxopt_big.quant._options import (MSE, PER_CHANNEL, PER_TENSOR, PER_TOKEN, AbsMax, Calibration, Format,
                                      Granularity, Group, MinMax, PerChannel, Percentile, PerTensor, PerToken)
from jaxopt_big.quant._qarray import integer_quantize

__all__ = ["Format", "QuantSpec", "PerTensor", "PerChannel", "PerToken", "Group", "PER_TENSOR", "PER_CHANNEL",
           "PER_TOKEN",
           "AbsMax", "MinMax", "Percentile", "MSE", "Granularity", "Calibration"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec(Format):
    """A uniform integer grid.

    Attributes:
      bits: 2..8. Narrow symmetric grids use the codes ``[-(2^(b-1)-1), 2^(b-1)-1]``; full-range and
        affine ones ``[-2^(b-1), 2^(b-1)-1]`` (all ``2^b`` codes; affine adds an integer zero point).
      symmetric: zero maps to integer 0 (no zero point) if True.
      granularity: ``PER_TENSOR``, ``PER_CHANNEL`` (one scale per index of ``axis``), ``PER_TOKEN`` (one
        scale per vector along the last axis, for dynamic activation scales) or ``Group(size)``.
      axis: channel axis for per-channel and per-group scales (-1: output features of a kernel).
      calibration: ``AbsMax()``, ``MinMax()``, ``Percentile(q)`` or ``MSE()``; None (default): ``AbsMax()``
        on symmetric grids and ``MinMax()`` on affine ones, whose zero point exists to fit a range that
        is not symmetric (AbsMax would put ``[-absmax, absmax]`` on the affine grid and waste codes).
      narrow: symmetric grids only. True: the narrow codes (int2 ``{-1, 0, 1}``, int8 ``[-127, 127]``);
        False: the full range (int2 ``{-2, -1, 0, 1}``), with the smallest absmax/min-max scale that
        clips neither the minimum (at ``-2^(b-1)``) nor the maximum (at ``2^(b-1)-1``); None (default):
        full range with ``MSE()`` calibration, which then picks per scale the better grid (see
        :class:`MSE`), narrow otherwise.
      scale_dtype: None (float32 scales), or ``float16`` / ``bfloat16``: scales (calibrated or given)
        are rounded to that format and a ``QArray`` stores them in it (2 bytes each; arithmetic with
        them runs in float32), so a file format that stores them so (GGUF ``Q4_0`` and ``Q8_0`` keep
        one float16 scale per block of 32) holds the quantized values exactly.
      activations: None (weight-only), or the grid a layer's input is put on at run time, one scale
        per token: a symmetric ``QuantSpec`` with ``granularity=PER_TOKEN`` (W8A8:
        ``QuantSpec(bits=8, granularity=PER_CHANNEL, activations=QuantSpec(bits=8, granularity=PER_TOKEN))``).
        Kernels quantized with it are ``QArray`` leaves that carry it, and their layer runs as
        ``int8 x int8 -> int32`` (see :mod:`jaxopt_big.quant._w8a8`).

    Examples:
      >>> QuantSpec(bits=4, granularity=PER_CHANNEL).qmax
      7
      >>> QuantSpec().calibration, QuantSpec(symmetric=False).calibration
      (AbsMax(), MinMax())
      >>> QuantSpec(bits=8, activations=QuantSpec(bits=8))
      Traceback (most recent call last):
      ...
      ValueError: QuantSpec.activations must be None or a symmetric QuantSpec with granularity=PER_TOKEN ...
      >>> QuantSpec(bits=9)
      Traceback (most recent call last):
      ...
      ValueError: QuantSpec.bits must be an int in [2, 8], got 9
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = PER_TENSOR
    axis: int = -1
    calibration: Calibration | None = None
    narrow: bool | None = None
    scale_dtype: Any = None
    activations: QuantSpec | None = None

    def __post_init__(self):
        _checks.store(self, bits=_checks.integer("QuantSpec.bits", self.bits, low=2, high=8),
                      symmetric=_checks.flag("QuantSpec.symmetric", self.symmetric))
        if self.narrow is not None:
            _checks.store(self, narrow=_checks.flag("QuantSpec.narrow (or None)", self.narrow))
        if self.narrow and not self.symmetric:
            raise ValueError("QuantSpec.narrow=True needs a symmetric grid (affine grids use all 2^bits codes)")
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerToken, Group)):
            raise TypeError(f"QuantSpec.granularity must be PER_TENSOR, PER_CHANNEL, PER_TOKEN or Group(size), "
                            f"got {self.granularity!r}")
        _checks.store(self, axis=_checks.integer("QuantSpec.axis", self.axis))
        if self.calibration is None:
            _checks.store(self, calibration=AbsMax() if self.symmetric else MinMax())
        if self.scale_dtype is not None:
            _checks.store(self, scale_dtype=_scale_dtype(self.scale_dtype))
        if not isinstance(self.calibration, (AbsMax, MinMax, Percentile, MSE)):
            raise TypeError(f"QuantSpec.calibration must be AbsMax(), MinMax(), Percentile(q) or MSE(), "
                            f"got {self.calibration!r}")
        a = self.activations
        if a is not None and not (isinstance(a, QuantSpec) and a.symmetric and isinstance(a.granularity, PerToken)
                                  and a.activations is None):
            raise ValueError(f"QuantSpec.activations must be None or a symmetric QuantSpec with "
                             f"granularity=PER_TOKEN (inputs are quantized per token at run time), got {a!r}")

    @property
    def full_range(self) -> bool:
        """Whether the grid uses all ``2^bits`` codes (``qmin = -2^(bits-1)``).

        Examples:
          >>> QuantSpec(bits=2).full_range, QuantSpec(bits=2, calibration=MSE()).full_range
          (False, True)
        """
        if not self.symmetric:
            return True
        return not self.narrow if self.narrow is not None else isinstance(self.calibration, MSE)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (0 if self.full_range else 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def calibrate(self, x, *, path=""):
        return integer_calibrate(x, self, path=path)

    def fake_quant(self, x, scale=None, zero_point=None, *, path=""):
        return integer_fake_quant(x, self, scale, zero_point, path=path)

    def quantize(self, x, scale=None, zero_point=None, *, path=""):
        if scale is not None:  # integer_quantize (in _qarray) trusts what it is given
            scale, zero_point = check_grid(scale, zero_point, path)
        return integer_quantize(x, self, scale, zero_point, path=path)


def _scale_dtype(value: Any) -> np.dtype:
    """``value`` as the NumPy dtype float16 or bfloat16, else ``ValueError``."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in ("float16", "bfloat16"):
        raise ValueError(f"QuantSpec.scale_dtype must be None, float16 or bfloat16, got {value!r}")
    return dtype
