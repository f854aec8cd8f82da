"""First (compile-inclusive) eager calls: our entry points vs hand-written op-by-op JAX on new shapes.

A user compressing a model eagerly meets every kernel shape once, so what a call costs there is
mostly compilation. Op-by-op dispatch compiles each primitive for each new shape; our entry points
compile one program per call. Cases, each on ``N`` distinct kernel shapes (the two paths never share
a shape, so neither reuses the other's compiled ops; they alternate, and swap shape sets, per shape):

- int4 per-channel round-to-nearest: ``jb.quant.quantize`` (checks, calibrates, packs int4) vs five
  lines of ``jnp`` (absmax scale, round, clip; no packing);
- rank-8 factorization: ``jb.lowrank.factorize`` vs ``jnp.linalg.svd`` and two slices;
- int8 fake quantization: ``jb.quant.fake_quant`` vs absmax, round, clip, rescale.

Goal: our calls together cost no more than the hand-written ones (ratio ours / hand <= 1); the
per-case ratios are in the details (the factorization is compile-bound by the SVD both paths compile).
Run: ``python benchmarks/eager_calls.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxopt_big as jb

from common import write

INT4 = jb.quant.QuantSpec(bits=4, granularity=jb.quant.PER_CHANNEL)
INT8 = jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL)


def hand_rtn(w):
    scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 7
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -8, 7).astype(jnp.int8), scale


def hand_factorize(w, r=8):
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


def hand_fake_quant(w):
    scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -128, 127) * scale


CASES = {
    "quantize int4": (lambda w: jb.quant.quantize(w, INT4), hand_rtn),
    "factorize rank 8": (lambda w: jb.lowrank.factorize(w, rank=8), hand_factorize),
    "fake_quant int8": (lambda w: jb.quant.fake_quant(w, INT8), hand_fake_quant),
}


def _seconds(fn, w) -> float:
    start = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn(w)))
    return time.perf_counter() - start


def main(quick: bool) -> None:
    n = 6 if quick else 16
    rng = np.random.default_rng(0)
    details, total_ours, total_hand = {}, 0.0, 0.0
    for c, (name, (ours, hand)) in enumerate(CASES.items()):
        t_ours = t_hand = 0.0
        for i in range(n):
            # Shapes no other call of this run has seen: the paths alternate and swap sets per shape.
            a = (40 + 24 * i + c, 24 + 8 * i + 3 * c)
            b = (a[0] + 1000, a[1] + 1000)
            first, second = (a, b) if i % 2 else (b, a)
            t_ours += _seconds(ours, rng.normal(size=first).astype(np.float32))
            t_hand += _seconds(hand, rng.normal(size=second).astype(np.float32))
        details[name] = {"ours_s": round(t_ours, 2), "hand_s": round(t_hand, 2),
                         "ours / hand": round(t_ours / t_hand, 3)}
        total_ours, total_hand = total_ours + t_ours, total_hand + t_hand
    write("eager_calls", ours=total_ours, baseline=total_hand,
          goal="first eager calls on new shapes cost <= the hand-written op-by-op code (all cases together)",
          holds=total_ours <= total_hand, details={**details, "shapes_per_case": n, "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="6 shapes per case instead of 16")
    main(parser.parse_args().quick)
