"""QAT step (int8 weights + activations) vs the float step, and qwix QAT on the same model, side by side.

Like for like: qwix quantizes a dot's activations per row (one scale per token) and differentiates
at the float operands; ours does so with ``activations=QuantSpec(granularity=PER_TOKEN)`` and
``gradient=Gradient.FLOAT``. Our default ``Gradient.QUANTIZED`` (gradient at the fake-quantized
operands) and per-tensor activation scales are timed in the same run and reported beside it.

Also records the bytes of int8 / int4 per-channel 1024x1024 float32 kernels (scales included).
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxopt_big as jb
from jaxopt_big.quant import PER_CHANNEL, PER_TOKEN, QuantSpec

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved, write  # noqa: E402


class MLP(nn.Module):
    width: int = 1024
    depth: int = 3

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def _step(apply):
    tx = optax.sgd(1e-3)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply({"params": p}, x), y).mean()

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    return step, tx


def main(quick: bool) -> None:
    import qwix

    width, batch = (512, 128) if quick else (1024, 256)
    copies = 1 if quick else 3  # compiled copies per candidate, each timed as its fastest (see interleaved)
    model = MLP(width=width)
    x = jax.random.normal(jax.random.key(0), (batch, width))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    params = model.init(jax.random.key(2), x)["params"]

    weights = QuantSpec(bits=8, granularity=PER_CHANNEL)
    per_token = QuantSpec(bits=8, granularity=PER_TOKEN)
    ours = {"ours": jb.quant.qat(model.apply, weights=weights, activations=per_token, gradient=jb.quant.Gradient.FLOAT),
            "ours_quantized_grad": jb.quant.qat(model.apply, weights=weights, activations=per_token),
            "ours_per_tensor": jb.quant.qat(model.apply, weights=weights, activations=QuantSpec(bits=8),
                                            gradient=jb.quant.Gradient.FLOAT)}
    rules = [qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
    qwix_model = qwix.quantize_model(model, qwix.QtProvider(rules))
    lowered = {}
    for name, apply in {"float": model.apply, **ours, "qwix": qwix_model.apply}.items():
        step, tx = _step(apply)
        state = tx.init(params)
        lowered[name] = step.lower(params, state, x, y), state
    fns = {name: [] for name in lowered}
    for _ in range(copies):  # compiled round-robin: no candidate's copies all come first or last
        for name, (low, state) in lowered.items():
            fns[name].append(lambda c=low.compile(), state=state: c(params, state, x, y))
    t = interleaved(fns, repeats=10 if quick else 60, warmup=3)
    ours_ratio, qwix_ratio = t["ours"] / t["float"], t["qwix"] / t["float"]

    w = jax.random.normal(jax.random.key(3), (1024, 1024))
    b8 = jb.quant.quantize(w, QuantSpec(bits=8, granularity=PER_CHANNEL)).nbytes
    b4 = jb.quant.quantize(w, QuantSpec(bits=4, granularity=PER_CHANNEL)).nbytes
    write("quant_qat_step", ours=t["ours"], baseline=t["qwix"],
          goal="ours/float <= qwix/float + 0.03 (same run; qwix's semantics: per-token activations, Gradient.FLOAT)",
          holds=ours_ratio <= qwix_ratio + 0.03,
          details={"model": f"3x{width} MLP, batch {batch}", "compiled_copies_each": copies, "float_step_s": t["float"],
                   "ours_over_float": round(ours_ratio, 4), "qwix_over_float": round(qwix_ratio, 4),
                   "ours_quantized_grad_over_float (default Gradient.QUANTIZED)":
                       round(t["ours_quantized_grad"] / t["float"], 4),
                   "ours_per_tensor_over_float (per-tensor activation scales)":
                       round(t["ours_per_tensor"] / t["float"], 4)})
    write("quant_bytes", ours=b4, baseline=w.nbytes, unit="bytes",
          goal="int8 >= 3.9x and int4 >= 7.5x smaller than float32 (1024x1024, per-channel, scales included)",
          holds=w.nbytes / b8 >= 3.9 and w.nbytes / b4 >= 7.5,
          details={"int8_bytes": b8, "int4_bytes": b4, "int8_ratio": round(w.nbytes / b8, 3),
                   "int4_ratio": round(w.nbytes / b4, 3)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
