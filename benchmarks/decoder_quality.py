"""Held-out perplexity of the trained corpus decoder after one-shot compression with the engine.

The decoder is the small Llama of ``benchmarks/train_decoder.py`` (trained there on Python's own
documentation if it is not saved yet). Every block linear is compressed by ``jb.oneshot.compress``
with calibration windows from the training split; perplexity is measured on the test split.

Table: dense; magnitude, Wanda, SparseGPT at 50% and 2:4; RTN vs GPTQ at int4 g128 and int3 g128;
SparseGPT 50% + GPTQ int4; beside each, the mean over layers of the engine's relative output error on
the calibration inputs (what each method minimises, layer by layer). Then the pruning methods at 50%
against the calibration-set size (4 / 16 / 64 / 256 sequences of 128 tokens: 4 gives 512 tokens,
fewer than the 768 inputs of ``down_proj``, so its Hessian is rank-deficient). Goals (the papers'
ordering): SparseGPT <= Wanda < magnitude at 50%, GPTQ < RTN at 3 and 4 bits.
Run: ``python benchmarks/decoder_quality.py [--quick]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jaxopt_big as jb  # noqa: E402
from common import write  # noqa: E402
from jaxopt_big.tree import Rule  # noqa: E402
from train_decoder import ARTIFACT, LENGTH, trained_decoder  # noqa: E402

CAL_LENGTH = 128
BATCH = 16
NM24 = jb.sparsity.NM(2, 4)


def _spec(bits: int) -> jb.quant.QuantSpec:
    return jb.quant.QuantSpec(bits=bits, symmetric=False, granularity=jb.quant.Group(128),
                              calibration=jb.quant.MinMax())


PLANS = {
    "magnitude 50%": jb.Plan(sparsity=jb.Magnitude(0.5)), "Wanda 50%": jb.Plan(sparsity=jb.Wanda(0.5)),
    "SparseGPT 50%": jb.Plan(sparsity=jb.SparseGPT(0.5)), "magnitude 2:4": jb.Plan(sparsity=jb.Magnitude(NM24)),
    "Wanda 2:4": jb.Plan(sparsity=jb.Wanda(NM24)), "SparseGPT 2:4": jb.Plan(sparsity=jb.SparseGPT(NM24)),
    "RTN int4 g128": jb.Plan(quant=jb.RTN(_spec(4))), "GPTQ int4 g128": jb.Plan(quant=jb.GPTQ(_spec(4))),
    "RTN int3 g128": jb.Plan(quant=jb.RTN(_spec(3))), "GPTQ int3 g128": jb.Plan(quant=jb.GPTQ(_spec(3))),
    "SparseGPT 50% + GPTQ int4 g128": jb.Plan(sparsity=jb.SparseGPT(0.5), quant=jb.GPTQ(_spec(4))),
}


def main(quick: bool) -> dict:
    from flax import nnx

    model = trained_decoder(ARTIFACT.with_name("decoder_quick") if quick else ARTIFACT)
    splits = jb.data.docs_corpus()
    test = jb.data.windows(splits.test, LENGTH)[: 16 if quick else None]
    rng = np.random.default_rng(0)
    pool = jb.data.windows(splits.train, CAL_LENGTH)
    pool = pool[rng.permutation(len(pool))]

    def calibration(n):
        batch = min(BATCH, n)
        return [pool[i:i + batch] for i in range(0, n, batch)]

    def perplexity(params):
        m = nnx.merge(nnx.graphdef(model), jb.leaves.densify(params), nnx.state(model, lambda p, x: not isinstance(
            x, nnx.Param)))
        return jb.data.perplexity(m, None, test)

    def run(plan, n):
        t = time.perf_counter()
        out, report = jb.oneshot.compress(model, None, calibration(n), jb.Recipe([Rule(r"layers/.*", plan)]),
                                          progress=False)
        return perplexity(out), time.perf_counter() - t, float(np.mean([r.error for r in report.rows]))

    dense = jb.data.perplexity(model, None, test)
    n_default = 32 if quick else 128
    rows = {"dense": {"perplexity": dense, "layer_error": 0.0, "seconds": 0.0}}
    for name, plan in PLANS.items():
        ppl, seconds, error = run(plan, n_default)
        rows[name] = {"perplexity": ppl, "layer_error": error, "seconds": round(seconds, 1)}
        print(name, rows[name], flush=True)
    sizes = (4, 16, 64) if quick else (4, 16, 64, 256)
    by_size = {n: {"magnitude 50%": rows["magnitude 50%"]["perplexity"],  # data-free: the same at every size
                   **{name: run(PLANS[name], n)[0] for name in ("Wanda 50%", "SparseGPT 50%")}} for n in sizes}
    ppl = {k: v["perplexity"] for k, v in rows.items()}
    checks = {"sparsegpt<=wanda@50%": ppl["SparseGPT 50%"] <= ppl["Wanda 50%"],
              "wanda<magnitude@50%": ppl["Wanda 50%"] < ppl["magnitude 50%"],
              "gptq<rtn@int4": ppl["GPTQ int4 g128"] < ppl["RTN int4 g128"],
              "gptq<rtn@int3": ppl["GPTQ int3 g128"] < ppl["RTN int3 g128"]}
    lines = ["| method | test perplexity | mean relative layer output error | s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['perplexity']:.3f} | {v['layer_error']:.4f} | {v['seconds']} |" for k, v in rows.items()]
    lines += ["", "| calibration sequences | " + " | ".join(by_size[sizes[0]]) + " |", "|---|" + "---|" * 3]
    lines += [f"| {n} | " + " | ".join(f"{v:.3f}" for v in r.values()) + " |" for n, r in by_size.items()]
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "decoder_quality_table.md").write_text("\n".join(lines) + "\n")
    return write("decoder_quality", ours=ppl["SparseGPT 50%"], baseline=ppl["magnitude 50%"], unit="ppl",
                 goal="papers' ordering: SparseGPT <= Wanda < magnitude at 50%, GPTQ < RTN at int4 and int3 g128",
                 holds=all(checks.values()),
                 details={"checks": checks, "rows": rows, "by_calibration_size": by_size,
                          "calibration_sequences": n_default, "calibration_length": CAL_LENGTH,
                          "test_windows": len(test), "quick": quick})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick decoder, 32 calibration sequences")
    main(parser.parse_args().quick)
