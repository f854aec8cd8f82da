"""Decode speed at batch 1 from packed weights, and what int8 weights and an int8 KV cache cost in quality.

* Speed: a decoder of real width (hidden 2048, SwiGLU 5632, 16 query / 4 key-value heads of 128, random
  weights; few blocks and a small vocabulary so the run stays short on a 2-core CPU) generates
  ``NEW`` tokens after a ``PROMPT``-token prompt with :func:`jaxopt_big.zoo.generate`, at batch 1:
  float32, bfloat16, int8 weight-only (per channel), int4 weight-only (group 128) and float32 with an
  int8 KV cache, in rotation in one process. The figure is decode tokens/s (the loop after the
  prefill), each candidate's fastest round (the machine may be shared: the fastest round is the least
  disturbed one; the medians are kept as ``median_speedup_vs_float32``). Every linear and the LM head are
  quantized; int8 and int4 weights run the integer decode path (``jaxopt_big/quant/_matmul.py``).
* Memory: the compiled temporaries of one decode step per candidate (``memory_analysis()``), with the
  kernels in the decode layout that ``generate`` runs (``jb.quant.decode_layout``: the same bytes): the
  packed kernels are unpacked tile by tile, never as a float copy of a layer's weights.
* Quality, on the small trained decoder of ``benchmarks/train_decoder.py`` (its full run when saved,
  else its ``--quick`` variant, trained on a quarter of the text, which this script trains if missing):
  validation perplexity with the int8 KV cache against the model-dtype cache, and the
  share of the first 64 greedy tokens that int8 (per-channel) weights generate as float32 does.

Run: ``python benchmarks/decode.py [--quick]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jaxopt_big as jb  # noqa: E402
from common import write  # noqa: E402
from jaxopt_big.quant import PER_CHANNEL, Group, QuantSpec  # noqa: E402
from jaxopt_big.zoo import CacheFormat  # noqa: E402
from train_decoder import ARTIFACT, LENGTH, train  # noqa: E402

LINEARS = r".*_proj/kernel|lm_head/kernel"
INT8 = QuantSpec(bits=8, granularity=PER_CHANNEL)
INT4 = QuantSpec(bits=4, granularity=Group(128))
PROMPT = 128


def config(blocks: int) -> jb.zoo.LlamaConfig:
    return jb.zoo.LlamaConfig(vocab_size=8192, hidden_size=2048, num_layers=blocks, num_heads=16, num_kv_heads=4,
                              intermediate_size=5632, max_positions=1024)


def candidates(model: jb.zoo.Llama) -> dict[str, tuple[object, CacheFormat]]:
    state = nnx.state(model, nnx.Param)
    return {"float32": (state, CacheFormat.MODEL),
            "bfloat16": (jax.tree.map(lambda x: x.astype(jnp.bfloat16), state), CacheFormat.MODEL),
            "int8": (jb.quant.quantize_params(state, INT8, where=LINEARS), CacheFormat.MODEL),
            "int4_g128": (jb.quant.quantize_params(state, INT4, where=LINEARS), CacheFormat.MODEL),
            "float32_int8_kv": (state, CacheFormat.INT8)}


def step_temporaries(model: jb.zoo.Llama, params, fmt: CacheFormat, length: int) -> int:
    """Compiled temporary bytes of one decode step (one token against a cache of ``length`` slots)."""
    graphdef, params = nnx.graphdef(model), jb.quant.decode_layout(params)
    dtype = nnx.to_pure_dict(params)["embed_tokens"]["embedding"].dtype
    c = model.config
    cache = jb.zoo.KVCache.empty(layers=c.num_layers, batch=1, kv_heads=c.num_kv_heads, length=length,
                                 head_dim=c.head_dim, dtype=dtype, fmt=fmt)

    def step(params, token, cache):
        m = nnx.merge(graphdef, params)
        run = jb.intercept.run_compressed(m) if jb.leaves.has_compressed(params) else m
        return run(token, cache=cache)
    compiled = jax.jit(step).lower(params, jnp.zeros((1, 1), jnp.int32), cache).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def speed(blocks: int, new: int, rounds: int) -> dict:
    model = jb.zoo.Llama(config(blocks), rngs=nnx.Rngs(0))
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (PROMPT,), 0, model.config.vocab_size))
    runs = candidates(model)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    tokens = {}
    for r in range(rounds + 1):  # round 0 compiles and warms up
        names = list(runs)
        for name in names[r % len(names):] + names[:r % len(names)]:
            params, fmt = runs[name]
            out = jb.zoo.generate(model, params, prompt, max_new_tokens=new, kv_cache=fmt, bucket=PROMPT)
            if r:
                seconds[name].append(out.decode_seconds / (new - 1))
            tokens[name] = out.tokens[0]
    per_token = {k: float(np.min(v)) for k, v in seconds.items()}
    median = {k: float(np.median(v)) for k, v in seconds.items()}
    temporaries = {k: step_temporaries(model, p, f, PROMPT + new) for k, (p, f) in runs.items()}
    return {"seconds_per_token": per_token,
            "tokens_per_second": {k: round(1 / v, 2) for k, v in per_token.items()},
            "speedup_vs_float32": {k: round(per_token["float32"] / v, 3) for k, v in per_token.items()},
            "median_speedup_vs_float32": {k: round(median["float32"] / v, 3) for k, v in median.items()},
            "decode_step_temporaries_bytes": temporaries,
            "weights_bytes": {k: jb.leaves.nbytes(p) for k, (p, _) in runs.items()},
            "greedy_agreement_with_float32": {k: float((v == tokens["float32"]).mean()) for k, v in tokens.items()},
            "blocks": blocks, "new_tokens": new, "prompt_tokens": PROMPT, "rounds": rounds}


def quality(quick: bool) -> dict:
    directory = ARTIFACT if (ARTIFACT / "training.json").exists() else ARTIFACT.with_name("decoder_quick")
    if not (directory / "training.json").exists():
        train(directory, fraction=0.25)
    model = jb.zoo.load_llama(directory)
    c = model.config
    windows = jb.data.windows(jb.data.docs_corpus().validation, LENGTH)[:16 if quick else 64]

    def nll(fmt: CacheFormat | None) -> float:
        @jax.jit
        def logits(ids):
            if fmt is None:
                return model(ids)
            cache = jb.zoo.KVCache.empty(layers=c.num_layers, batch=ids.shape[0], kv_heads=c.num_kv_heads,
                                         length=ids.shape[1], head_dim=c.head_dim, dtype=jnp.float32, fmt=fmt)
            return model(ids, cache=cache)[0]
        total = 0.0
        for i in range(0, len(windows), 8):
            ids = jnp.asarray(windows[i:i + 8])
            logp = jax.nn.log_softmax(logits(ids)[:, :-1], -1)
            total += float(-jnp.take_along_axis(logp, ids[:, 1:, None], -1).sum())
        return total / (len(windows) * (LENGTH - 1))

    ppl = {"no_cache": np.exp(nll(None)), "model_cache": np.exp(nll(CacheFormat.MODEL)),
           "int8_cache": np.exp(nll(CacheFormat.INT8))}
    state = nnx.state(model, nnx.Param)
    int8 = jb.quant.quantize_params(state, INT8, where=LINEARS)
    prompts = np.stack([w[:64] for w in windows[:8]])
    float_tokens = jb.zoo.generate(model, state, prompts, max_new_tokens=64).tokens
    int8_tokens = jb.zoo.generate(model, int8, prompts, max_new_tokens=64).tokens
    first_diverge = [int(np.argmax(a != b)) if (a != b).any() else 64 for a, b in zip(float_tokens, int8_tokens)]
    return {"perplexity": {k: round(float(v), 4) for k, v in ppl.items()},
            "int8_kv_perplexity_change": f"{100 * (ppl['int8_cache'] / ppl['model_cache'] - 1):+.3f}%",
            "int8_weights_greedy_match_first_64": float((float_tokens == int8_tokens).mean()),
            "int8_weights_tokens_before_first_difference": first_diverge,
            "decoder": str(directory), "windows": len(windows), "greedy_prompts": len(prompts)}


def main(quick: bool) -> None:
    start = time.perf_counter()
    measured = speed(blocks=2, new=64 if quick else 256, rounds=1 if quick else 3)
    checked = quality(quick)
    s = measured["speedup_vs_float32"]
    ppl_change = checked["perplexity"]["int8_cache"] / checked["perplexity"]["model_cache"] - 1
    holds = (s["int8"] >= 1.5 and s["int4_g128"] >= 2.0 and abs(ppl_change) < 0.005
             and checked["int8_weights_greedy_match_first_64"] >= 0.9)
    per_token = measured["seconds_per_token"]
    write("decode", ours=per_token["int4_g128"], baseline=per_token["float32"], unit="s/token",
          goal="batch-1 decode: int8 weights >= 1.5x and int4 g128 >= 2x float32 tokens/s; int8 KV cache "
               "perplexity within 0.5%; int8 greedy tokens equal float32's on >= 90% of the first 64",
          holds=holds, details={**measured, **checked, "quick": quick,
                                "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 new tokens, one round, fewer validation windows")
    main(parser.parse_args().quick)
