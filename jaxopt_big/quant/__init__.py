"""Quantization: typed integer grids, fake-quant with straight-through gradients, calibration,
packed ``QArray`` leaves, PTQ and QAT for linen and nnx, and integer execution.

Examples:
  >>> import jax.numpy as jnp, jaxopt_big as jb
  >>> q = jb.quant.quantize(jnp.ones((4, 4)), jb.quant.QuantSpec(bits=4))
  >>> q.nbytes
  12
"""

from jaxopt_big.quant.calibrate import calibrate, expand
from jaxopt_big.quant.fake import fake_quant, ste
from jaxopt_big.quant.qarray import QArray, container_bits, dequantize, quantize
from jaxopt_big.quant.spec import (MSE, PER_CHANNEL, PER_TENSOR, AbsMax, Calibration, Format, Granularity, Group,
                                   MinMax, PerChannel, Percentile, PerTensor, QuantSpec)

__all__ = ["QuantSpec", "Format", "PerTensor", "PerChannel", "Group", "PER_TENSOR", "PER_CHANNEL", "Granularity",
           "AbsMax", "MinMax", "Percentile", "MSE", "Calibration", "calibrate", "expand", "fake_quant", "ste",
           "QArray", "quantize", "dequantize", "container_bits"]
