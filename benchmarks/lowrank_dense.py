"""A factorized Dense layer run as ``(x @ u) @ v`` vs the dense matmul it replaces.

4096x4096 kernel at rank 256, batch 256 (``--quick``: 2048x2048, rank 128, batch 128; same FLOP
ratio of 8). Goal: speedup >= 0.8 x the FLOP ratio. Both run through ``nn.Dense``: ours via
``jb.lowrank.apply`` on a ``LowRank`` kernel, the baseline on the dense kernel; a hand-written
``(x @ u) @ v`` is timed alongside for reference.
Run: ``python benchmarks/lowrank_dense.py [--quick]``.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax

import jaxopt_big as jb

from common import interleaved, write


def main(quick: bool) -> None:
    n, rank, batch = (2048, 128, 128) if quick else (4096, 256, 256)
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (batch, n))
    model = nn.Dense(n)
    params = model.init(k2, x)["params"]
    low = jb.lowrank.factorize_params(params, rank=rank, randomized=True, key=k2)
    kernel = low["kernel"]

    ours = jax.jit(jb.lowrank.apply(model.apply))
    dense = jax.jit(model.apply)
    by_hand = jax.jit(lambda u, v, b, x: (x @ u) @ v + b)
    times = interleaved({
        "factorized": lambda: ours({"params": low}, x),
        "dense": lambda: dense({"params": params}, x),
        "by_hand": lambda: by_hand(kernel.u, kernel.v, low["bias"], x),
    }, repeats=10 if quick else 30, warmup=2)
    flop_ratio = (n * n) / (rank * 2 * n)
    speedup = times["dense"] / times["factorized"]
    write("lowrank_dense", ours=times["factorized"], baseline=times["dense"],
          goal=f"dense / factorized >= 0.8 x FLOP ratio ({0.8 * flop_ratio:.1f}x)", holds=speedup >= 0.8 * flop_ratio,
          details={"shape": f"{n}x{n}", "rank": rank, "batch": batch, "flop_ratio": flop_ratio,
                   "speedup": round(speedup, 3), "speedup / flop_ratio": round(speedup / flop_ratio, 3),
                   "by_hand_s": times["by_hand"], "by_hand speedup": round(times["dense"] / times["by_hand"], 3),
                   "bytes dense / factorized": round(params["kernel"].nbytes / kernel.nbytes, 3), "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    main(parser.parse_args().quick)
