"""Automatic mixed precision on the trained decoder: ``auto`` against uniform GPTQ at the same or fewer bytes.

The decoder is the small Llama of ``benchmarks/train_decoder.py``. ``jb.oneshot.auto`` measures every
block linear's absolute output error at 2, 3, 4 and 8 bits (GPTQ, groups of 128, MSE grid: the
``gptq-int4`` preset's grid; one engine run per width) on calibration windows of the training split;
``jb.recipe.auto`` then picks bits per layer by the exact knapsack under a budget of average bits per
weight, scales included. Held-out perplexity (test split) and the stored bytes of the compressed
linears, side by side: float; uniform int4 g128; uniform int3 g128; auto at 4.25 bits per weight;
auto at exactly uniform int4's bytes; auto at 5.25. Goal (issue 30): auto has lower perplexity than
uniform int4 at the same or fewer bytes.
Run: ``python benchmarks/auto_bits.py [--quick]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jaxopt_big as jb  # noqa: E402
from common import write  # noqa: E402
from decoder_quality import BATCH, CAL_LENGTH  # noqa: E402
from train_decoder import ARTIFACT, LENGTH, trained_decoder  # noqa: E402

CHOICES = (2, 3, 4, 5, 6, 8)


def main(quick: bool) -> dict:
    from flax import nnx

    model = trained_decoder(ARTIFACT.with_name("decoder_quick") if quick else ARTIFACT)
    splits = jb.data.docs_corpus()
    test = jb.data.windows(splits.test, LENGTH)[: 16 if quick else 64]
    pool = jb.data.windows(splits.train, CAL_LENGTH)
    pool = pool[np.random.default_rng(0).permutation(len(pool))][: 16 if quick else 64]
    batches = [pool[i:i + BATCH] for i in range(0, len(pool), BATCH)]

    def perplexity(params):
        others = nnx.state(model, lambda p, x: not isinstance(x, nnx.Param))
        return jb.data.perplexity(nnx.merge(nnx.graphdef(model), jb.leaves.densify(params), others), None, test)

    weights: dict = {}

    def measure(options):
        t = time.perf_counter()
        recipe, sens = jb.oneshot.auto(model, None, batches, options, progress=False)
        weights["n"] = sens.total_weights()
        return recipe, sens, time.perf_counter() - t

    done: list = []
    rows = {"float": {"perplexity": perplexity(nnx.state(model, nnx.Param)), "bytes": 0, "bpw": 32.0,
                      "output_error": 0.0, "widths": "-"}}

    def run(name, recipe):
        key = [(path, next(r for r in recipe.rules if r.matches(path)).value) for path in sens.weights]
        same = [n for k, n in done if k == key]
        if same:  # the same plan per layer as an earlier row: measured once
            rows[name] = {**rows[same[0]], "same_as": same[0]}
            return
        out, report = jb.oneshot.compress(model, None, batches, recipe, progress=False)
        flat = dict(zip(jb.tree.paths(out), jax.tree.leaves(out, is_leaf=jb.leaves.is_compressed)))
        kernels = [flat[f"{r.path}/kernel"] for r in report.rows]
        stored = sum(k.nbytes for k in kernels)
        chosen = [k.bits for k in kernels]
        rows[name] = {"perplexity": perplexity(out), "bytes": stored, "bpw": 8 * stored / weights["n"],
                      "output_error": sum(r.error * r.energy for r in report.rows),
                      "widths": ", ".join(f"{chosen.count(b)}x{b}" for b in CHOICES if b in chosen)}
        done.append((key, name))
        print(name, rows[name], flush=True)

    # the defaults (GPTQ, groups of 128, MSE grid, float32 scales, choices 2, 3, 4, 5, 6, 8)
    options = jb.recipe.Auto(bits=4.25, choices=CHOICES)
    auto, sens, measure_seconds = measure(options)
    rows["float"]["bytes"] = 4 * weights["n"]
    at = {b: sens.average_bits({p: b for p in sens.weights}) for b in CHOICES}  # uniform widths, scales included
    run("GPTQ int4 g128", options.uniform(4))
    run("GPTQ int3 g128", options.uniform(3))
    run("auto 4.25 bpw", auto)
    run(f"auto at int4's bytes ({at[4]:.4g} bpw)", jb.recipe.auto(sens, jb.recipe.Auto(bits=at[4])))
    run("auto 5.25 bpw", jb.recipe.auto(sens, jb.recipe.Auto(bits=5.25)))
    spread = {b: max(e[b] for e in sens.errors.values()) / min(e[b] for e in sens.errors.values()) for b in CHOICES}
    int4, same = rows["GPTQ int4 g128"], rows[f"auto at int4's bytes ({at[4]:.4g} bpw)"]
    holds = same["perplexity"] < int4["perplexity"] and same["bytes"] <= int4["bytes"]
    lines = [f"Trained decoder, {len(sens.weights)} block linears ({weights['n']:,} weights), {len(pool)} calibration "
             f"windows of {CAL_LENGTH}, {len(test)} test windows of {LENGTH}; measuring {len(CHOICES)} widths took "
             f"{measure_seconds:.0f} s ({len(CHOICES)} engine runs). Bits per weight count the scales (each width is "
             f"packed at its own width: int3 {at[3]:.4g} bpw, int5 {at[5]:.4g}). Largest / smallest layer output "
             "error at " + ", ".join(
                 f"{b} bits: {v:.3g}" for b, v in spread.items()) + ".", "",
             "| model | test perplexity | bytes of the linears | bits per weight | summed output error | widths |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['perplexity']:.4f} | {v['bytes']:,} | {v['bpw']:.4g} | {v['output_error']:.4g} | "
              f"{v['widths']}{' (= ' + v['same_as'] + ')' if 'same_as' in v else ''} |" for k, v in rows.items()]
    lines += ["", f"auto / uniform int4 perplexity at the same bytes: {same['perplexity'] / int4['perplexity']:.4f} "
              f"({'holds' if holds else 'does NOT hold'}: auto < int4 at <= its bytes)"]
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "auto_bits_table.md").write_text("\n".join(lines) + "\n")
    return write("auto_bits", ours=same["perplexity"], baseline=int4["perplexity"], unit="ppl",
                 goal="auto (GPTQ 2/3/4/5/6/8 bits per layer) < uniform GPTQ int4 g128 in perplexity, at <= its bytes",
                 holds=holds, details={"rows": rows,
                                       "error_spread": spread, "measure_seconds": round(measure_seconds, 1),
                                       "calibration_windows": len(pool), "test_windows": len(test), "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick decoder, 16 calibration and test windows")
    main(parser.parse_args().quick)
