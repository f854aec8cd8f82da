"""Serving a compressed nnx Llama: packed int4 kernels unpacked per layer inside the compiled forward,
and int8 weights x dynamic per-token int8 activations as real s8 x s8 -> s32 dots."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxopt_big as jb
from jaxopt_big.quant import PER_CHANNEL, PER_TOKEN, Group, QuantSpec

# Weights dominate this model's memory, as they do a large decoder's; 4 blocks, 29 linears.
CONFIG = jb.zoo.LlamaConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=512, max_positions=64)
LINEARS = r".*_proj/kernel|lm_head/kernel"
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 16)), jnp.int32)


def _split():
    return nnx.split(jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0)))


def _memory(fn, state):
    m = jax.jit(fn).lower(state, IDS).compile().memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes


def test_int4_forward_keeps_weights_packed():
    graphdef, state = _split()
    packed = jb.quant.quantize_params(state, QuantSpec(bits=4, granularity=Group(128)), where=LINEARS)
    dense = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
    serve = lambda s, ids: jb.quant.qat(nnx.merge(graphdef, s))(ids)  # noqa: E731
    ratio = _memory(serve, packed) / _memory(dense, state)
    assert ratio <= 0.35, ratio
    # the packed forward computes exactly the dequantized model
    np.testing.assert_allclose(jax.jit(serve)(packed, IDS), dense(jb.leaves.densify(packed), IDS), atol=1e-5, rtol=1e-5)


def test_int8_forward_runs_s8_dots_into_s32():
    graphdef, state = _split()
    q8 = jb.quant.quantize_params(state, QuantSpec(bits=8, granularity=PER_CHANNEL), where=LINEARS)
    a8 = QuantSpec(bits=8, granularity=PER_TOKEN)
    serve = jax.jit(lambda s, ids: jb.quant.qat(nnx.merge(graphdef, s), activations=a8)(ids))
    lowered = serve.lower(q8, IDS)
    int_dots = re.findall(r"stablehlo\.dot_general[^\n]*\(tensor<[0-9x]+xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>",
                          lowered.as_text())
    assert len(int_dots) == 4 * 7 + 1  # every linear: q k v o gate up down per block, and the head
    compiled = lowered.compile().as_text()
    assert len(re.findall(r"= s32\[[0-9,]+\]\{[0-9,]+\} dot\(", compiled)) == 29  # XLA kept them integer
    out = serve(q8, IDS)
    dense = nnx.merge(graphdef, state)(IDS)
    assert float(jnp.abs(out - dense).max()) < 0.05 * float(jnp.abs(dense).max())
