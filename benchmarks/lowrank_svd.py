"""Randomized (Halko) vs full SVD for a rank-64 factorization of a 2048x2048 low-rank + noise matrix.

Goal: the randomized SVD >= 10x faster with Frobenius error <= 1.02x the Eckart-Young optimum
(``--quick``: 1024x1024, rank 32). Both through ``jb.lowrank.factorize``, jitted.
Run: ``python benchmarks/lowrank_svd.py [--quick]``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxopt_big as jb

from common import interleaved, write


def main(quick: bool) -> None:
    n, rank = (1024, 32) if quick else (2048, 64)
    k1, k2, k3, key = jax.random.split(jax.random.key(0), 4)
    w = (jax.random.normal(k1, (n, rank)) @ jax.random.normal(k2, (rank, n)) / np.sqrt(rank)
         + 0.1 * jax.random.normal(k3, (n, n)))
    full = jax.jit(functools.partial(jb.lowrank.factorize, rank=rank))
    randomized = jax.jit(functools.partial(jb.lowrank.factorize, rank=rank, randomized=True))
    times = interleaved({"randomized": lambda: randomized(w, key=key), "full": lambda: full(w)},
                        repeats=3 if quick else 5, warmup=1)
    s = np.linalg.svd(np.asarray(w), compute_uv=False).astype(np.float64)
    optimum = float(np.sqrt((s[rank:] ** 2).sum()))
    error = lambda lr: float(jnp.linalg.norm(w - lr.dense()))
    err_rand, err_full = error(randomized(w, key=key)), error(full(w))
    speedup = times["full"] / times["randomized"]
    write("lowrank_svd", ours=times["randomized"], baseline=times["full"],
          goal="full / randomized >= 10x and error <= 1.02x optimum",
          holds=speedup >= 10 and err_rand <= 1.02 * optimum,
          details={"shape": f"{n}x{n}", "rank": rank, "speedup": round(speedup, 2),
                   "error / optimum (randomized)": round(err_rand / optimum, 5),
                   "error / optimum (full)": round(err_full / optimum, 5), "oversample": 10, "power_iters": 2,
                   "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    main(parser.parse_args().quick)
