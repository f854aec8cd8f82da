"""Quantization: typed integer grids, fake-quant with straight-through gradients, calibration,
packed ``QArray`` leaves, PTQ and QAT for linen and nnx, and integer execution.

Examples:
  >>> import jax.numpy as jnp, jaxopt_big as jb
  >>> q = jb.quant.quantize(jnp.ones((4, 4)), jb.quant.QuantSpec(bits=4))
  >>> q.nbytes
  12
"""

from jaxopt_big.quant._awq import AWQClip, AWQScales, awq_clip, awq_scales
from jaxopt_big.quant._calibrate import calibrate, expand
from jaxopt_big.quant._cluster import Clustered, KMeans, cluster, codebooks, kmeans, with_codebooks
from jaxopt_big.quant._fake import fake_quant, ste
from jaxopt_big.quant._formats import F8, Binary, Float8, Float8Array, SubByteArray, Ternary, pack_bits, unpack_bits
from jaxopt_big.quant._gptq import gptq, gptq_kernel, gptq_params
from jaxopt_big.quant._hadamard import hadamard, hadamard_supported, hadamard_transform, random_hadamard
from jaxopt_big.quant._lsq import LSQ, Learned, lsq, lsq_export
from jaxopt_big.quant._mixed import allocate_bits, allocation_rules, layer_bytes, sensitivity
from jaxopt_big.quant._ptq import Scale, calibrate_activations, dequantize_params, fake_quant_params, quantize_params
from jaxopt_big.quant._matmul import DecodeArray
from jaxopt_big.quant._qarray import QArray, container_bits, decode_layout, dequantize, quantize
from jaxopt_big.quant._qat import Gradient, qat
from jaxopt_big.quant._smoothquant import scale_input_channels, smoothquant_scales, unscale_output_channels
from jaxopt_big.quant._spec import (MSE, PER_CHANNEL, PER_TENSOR, PER_TOKEN, AbsMax, Calibration, Format, Granularity,
                                    Group, MinMax, PerChannel, Percentile, PerTensor, PerToken, QuantSpec)

__all__ = ["QuantSpec", "Format", "PerTensor", "PerChannel", "Group", "PER_TENSOR", "PER_CHANNEL", "PerToken",
           "PER_TOKEN", "Granularity", "AbsMax", "MinMax", "Percentile", "MSE", "Calibration", "calibrate", "expand",
           "fake_quant", "ste", "QArray", "quantize", "dequantize", "container_bits", "quantize_params",
           "dequantize_params", "fake_quant_params", "calibrate_activations", "Scale", "qat", "Gradient", "LSQ",
           "Learned", "lsq", "lsq_export", "Binary", "Ternary", "Float8", "F8", "SubByteArray", "Float8Array",
           "pack_bits", "unpack_bits", "Clustered", "KMeans", "cluster", "kmeans", "codebooks", "with_codebooks",
           "sensitivity", "layer_bytes", "allocate_bits", "allocation_rules", "gptq_params", "gptq_kernel", "gptq",
           "awq_scales", "AWQScales", "awq_clip", "AWQClip", "smoothquant_scales", "scale_input_channels",
           "unscale_output_channels", "hadamard", "hadamard_supported", "hadamard_transform", "random_hadamard",
           "DecodeArray", "decode_layout"]
