"""The one-shot engine's cost in depth: decoders of one width with 4 and 16 blocks, GPTQ int4 everywhere.

Each depth runs in its own subprocess, which builds the nnx Llama, runs one forward pass over the
calibration set (that peak resident memory is the baseline), then ``jb.oneshot.compress`` with GPTQ
int4 g128 on every linear. It reports the wall time of ``compress``, its peak resident memory above
the baseline, and how many passes over the calibration set it made (block runs per block, plus the
capture of the first block's inputs, which runs only the embeddings).

Goals (issue 17): time(16) <= 4.6 x time(4); <= 3 forward passes; extra memory(16) <= 1.5 x extra memory(4).
Run: ``python benchmarks/oneshot_scaling.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

WIDTH, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 512, 256
BATCHES, BATCH, LENGTH = 8, 4, 128


def child(depth: int, quick: bool) -> dict:
    """One depth, measured in this (fresh) process."""
    import jax
    import numpy as np
    from flax import nnx

    import jaxopt_big as jb
    from jaxopt_big.tree import Rule

    config = jb.zoo.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH // (2 if quick else 1), num_layers=depth,
                                num_heads=HEADS, num_kv_heads=KV_HEADS, intermediate_size=FFN // (2 if quick else 1),
                                max_positions=LENGTH)
    model = jb.zoo.Llama(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32) for _ in range(BATCHES // (2 if quick else 1))]
    forward = nnx.jit(lambda m, ids: m(ids))
    for ids in batches:
        jax.block_until_ready(forward(model, ids))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    spec = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128 // (2 if quick else 1)))
    recipe = jb.Recipe([Rule(r"layers/.*", jb.Plan(quant=jb.GPTQ(spec)))])
    start = time.perf_counter()
    compressed, report = jb.oneshot.compress(model, None, batches, recipe, progress=False)
    jax.block_until_ready(jax.tree.leaves(compressed))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"depth": depth, "seconds": seconds, "baseline_mb": base, "peak_mb": peak, "extra_mb": peak - base,
            "layers": len(report.rows), "block_passes": report.block_passes,
            "forward_passes": report.block_passes + 1, "max_error": max(r.error for r in report.rows)}


def main(quick: bool) -> dict:
    from common import write

    runs = {}
    for depth in (4, 16):
        out = subprocess.run([sys.executable, __file__, "--child", str(depth)] + (["--quick"] if quick else []),
                             check=True, capture_output=True, text=True)
        runs[depth] = json.loads(out.stdout.strip().splitlines()[-1])
        print(runs[depth], flush=True)
    time_ratio = runs[16]["seconds"] / runs[4]["seconds"]
    memory_ratio = runs[16]["extra_mb"] / max(runs[4]["extra_mb"], 1.0)
    passes = max(r["forward_passes"] for r in runs.values())
    checks = {"time16/time4<=4.6": time_ratio <= 4.6, "forward_passes<=3": passes <= 3,
              "extra_memory16/extra_memory4<=1.5": memory_ratio <= 1.5}
    return write("oneshot_scaling", ours=runs[16]["seconds"], baseline=runs[4]["seconds"], unit="s",
                 goal="jb.oneshot.compress, GPTQ int4 on every linear: 16 blocks <= 4.6x the time of 4 blocks, "
                      "<= 3 passes over the calibration set, extra peak memory 16 blocks <= 1.5x 4 blocks",
                 holds=all(checks.values()),
                 details={"checks": checks, "time_ratio": time_ratio, "memory_ratio": memory_ratio,
                          "runs": runs, "quick": quick,
                          "model": f"Llama width {WIDTH // (2 if quick else 1)}, GQA {HEADS}/{KV_HEADS}, "
                                   f"{BATCHES // (2 if quick else 1)} batches of {BATCH}x{LENGTH} tokens"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half width, half the calibration set")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quick)))
    else:
        main(args.quick)
