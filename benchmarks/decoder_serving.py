"""Serving the trained decoder compressed: packed int4 memory and int8 x int8 -> int32 speed.

* Memory: the compiled forward of the int4 decoder (group-128 ``QArray`` kernels on every linear,
  the layout GPTQ and round-to-nearest both produce) unpacks each layer inside the computation, so
  ``memory_analysis()`` arguments + temporaries stay far below the float32 model's. Reported for a
  single 64-token request (the goal) and larger shapes, where activations start to dominate a model
  this small.
* Speed: the int8 decoder (per-channel int8 weights, dynamic per-token int8 activations) runs every
  linear as an ``s8 x s8 -> s32`` dot; its forward on 8 x 256 tokens is timed against the float32
  forward, interleaved in one process (each as the fastest of three compiled copies: one copy's
  speed varies by 10-20% with where its code and buffers land), and its validation perplexity
  compared with float's.
* Ceiling: each distinct linear shape of that forward (2048 tokens) as one ``s8 x s8 -> s32`` dot
  against its float32 dot, timed alone the same way. The int8 forward cannot gain more than its
  dots do; on a CPU without VNNI (AVX2 only) they gain little.

The decoder is ``benchmarks/train_decoder.py``'s (trained first if missing).
Run: ``python benchmarks/decoder_serving.py [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jaxopt_big as jb  # noqa: E402
from common import interleaved, write  # noqa: E402
from jaxopt_big.quant import PER_CHANNEL, PER_TOKEN, Group, QuantSpec  # noqa: E402
from train_decoder import LENGTH, trained_decoder  # noqa: E402

LINEARS = r".*_proj/kernel|lm_head/kernel"
INT4 = QuantSpec(bits=4, granularity=Group(128))
INT8 = QuantSpec(bits=8, granularity=PER_CHANNEL)
TOKENS_INT8 = QuantSpec(bits=8, granularity=PER_TOKEN)
MEMORY_SHAPES = [(1, 64), (1, 256), (8, 256)]
COPIES = 3


def forwards(graphdef):
    """Jitted forwards taking the state as an argument (so its bytes count as arguments, not constants)."""
    dense = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    packed = jax.jit(lambda s, ids: jb.quant.qat(nnx.merge(graphdef, s))(ids))
    int8 = jax.jit(lambda s, ids: jb.quant.qat(nnx.merge(graphdef, s), activations=TOKENS_INT8)(ids))
    return dense, packed, int8


def dot_ceiling(config: jb.zoo.LlamaConfig, tokens: int, repeats: int) -> dict[str, float]:
    """float32 / int8 time of each distinct linear shape of the forward as a lone dot (> 1: int8 faster)."""
    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    shapes = sorted({(h, config.num_heads * config.head_dim), (h, kv), (h, config.intermediate_size),
                     (config.intermediate_size, h), (h, config.vocab_size)})
    f32 = jax.jit(lambda x, w: x @ w)
    s8 = jax.jit(lambda x, w: jax.lax.dot(x, w, preferred_element_type=jnp.int32))
    ratios = {}
    for k, n in shapes:
        x, w = jax.random.normal(jax.random.key(0), (tokens, k)), jax.random.normal(jax.random.key(1), (k, n))
        xi, wi = (20 * x).astype(jnp.int8), (20 * w).astype(jnp.int8)
        t = interleaved({"float32": functools.partial(f32, x, w), "int8": functools.partial(s8, xi, wi)},
                        repeats=repeats)
        ratios[f"{tokens}x{k}x{n}"] = round(t["float32"] / t["int8"], 3)
    return ratios


def compiled_bytes(fn, state, shape) -> int:
    m = fn.lower(state, jax.ShapeDtypeStruct(shape, jnp.int32)).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes)


def main(quick: bool) -> None:
    model = trained_decoder()
    graphdef, state = nnx.split(model)
    int4 = jb.quant.quantize_params(state, INT4, where=LINEARS)
    int8 = jb.quant.quantize_params(state, INT8, where=LINEARS)
    dense, packed, int8_fwd = forwards(graphdef)

    memory = {}
    for shape in MEMORY_SHAPES:
        f, q = compiled_bytes(dense, state, shape), compiled_bytes(packed, int4, shape)
        memory[f"{shape[0]}x{shape[1]}"] = {"float32_bytes": f, "int4_bytes": q, "ratio": round(q / f, 4)}
    memory_ratio = memory["1x64"]["ratio"]

    windows = jb.data.windows(jb.data.docs_corpus().validation, LENGTH)
    windows = windows[:16] if quick else windows
    ppl = {"float32": jb.data.perplexity(lambda s, ids: dense(s, ids), state, windows),
           "int8": jb.data.perplexity(lambda s, ids: int8_fwd(s, ids), int8, windows),
           "int4": jb.data.perplexity(lambda s, ids: packed(s, ids), int4, windows)}
    ppl_change = ppl["int8"] / ppl["float32"] - 1

    ids = jnp.asarray(windows[:8])
    copies = [forwards(graphdef) for _ in range(COPIES)]  # each candidate timed as its fastest compiled copy
    times = interleaved({"float32": [lambda c=c: c[0](state, ids) for c in copies],
                         "int8": [lambda c=c: c[2](int8, ids) for c in copies]}, repeats=5 if quick else 20)
    speedup = times["float32"] / times["int8"]
    ceiling = dot_ceiling(model.config, ids.size, repeats=5 if quick else 20)
    holds = speedup >= 1.2 and abs(ppl_change) <= 0.01 and memory_ratio <= 0.35
    write("decoder_serving", ours=times["int8"], baseline=times["float32"],
          goal="int8 forward (8x256 tokens) >= 1.2x faster than float32 with perplexity within 1%; "
               "int4 compiled forward (1x64) arguments+temporaries <= 0.35x float32",
          holds=holds, details={"speedup": round(speedup, 3), "perplexity": {k: round(v, 4) for k, v in ppl.items()},
                                "int8_perplexity_change": f"{100 * ppl_change:+.3f}%",
                                "int8_dot_speedup_by_shape": ceiling,
                                "int4_memory_ratio_1x64": memory_ratio, "memory": memory,
                                "weights_bytes": {"float32": jb.leaves.nbytes(state), "int4": jb.leaves.nbytes(int4),
                                                  "int8": jb.leaves.nbytes(int8)},
                                "validation_windows": len(windows), "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="16 validation windows, fewer timing rounds")
    main(parser.parse_args().quick)
