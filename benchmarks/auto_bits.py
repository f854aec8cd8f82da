"""Automatic mixed precision on the trained decoder: ``auto`` against uniform GPTQ at the same or fewer bytes.

The decoder is the small Llama of ``benchmarks/train_decoder.py``. ``jb.oneshot.auto`` quantizes every
block linear at 2, 3, 4, 5, 6 and 8 bits (GPTQ, groups of 128, MSE grid: the ``gptq-int4`` preset's
grid) on calibration windows of the training split, split into 2 folds: per fold and width one engine
run on the other fold's batches, and each layer and width scored on the fold's own batches by the
second-order estimate of the next-token loss increase its quantized kernel makes alone (gradient term
plus diagonal-Fisher term on the layer's output; one backward pass of the float model per batch).
``jb.recipe.auto`` then checks on each held-out fold which lowest width to choose among (the
allocation chosen on the other fold against uniform bits, both run in the whole model), or keeps
uniform bits, and picks bits per layer by the exact knapsack under a budget of average bits per
weight, scales included. Held-out perplexity (validation and test splits) and the stored bytes of the
compressed linears, side by side: float; uniform int3/int4/int5 g128; auto at exactly each uniform
width's bytes. Goal (issue 30): auto has lower perplexity than uniform int4 at the same or fewer bytes.
Nothing auto decides reads the validation or test windows.

Checked on the calibration windows only (never the test windows): how well each score predicts the
calibration loss increase of quantizing one layer alone (rank correlation over layers, at 3 and 4 bits),
for auto's cost and for the plain output error ``tr(D^T H D)`` that auto used before; and whether
single-layer increases add up to the increase of the whole configuration.
``--measured``: auto measures each cost (the calibration loss with that one layer quantized, one forward
pass per layer and width) instead of estimating it; results in ``auto_bits_measured``. ``--folds 1``:
auto as before the held-out check (one engine run per width on all batches, in-sample costs, no
check); results in ``auto_bits_folds1``. ``--calibration validation``: calibration windows from the
validation split, which the decoder was not trained on (then the validation perplexity is not held out;
the test perplexity still is); results in ``auto_bits_validation_calibration``.
Run: ``python benchmarks/auto_bits.py [--measured] [--folds N] [--calibration train|validation]``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jaxopt_big as jb  # noqa: E402
from common import write  # noqa: E402
from decoder_quality import BATCH, CAL_LENGTH  # noqa: E402
from train_decoder import ARTIFACT, LENGTH, trained_decoder  # noqa: E402

CHOICES = (2, 3, 4, 5, 6, 8)
UNIFORM = (3, 4, 5)


def next_token_loss(logits, ids):
    """Summed next-token negative log-likelihood of one calibration batch (the loss auto's Fisher uses)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1).sum()


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(measured: bool, folds: int, calibration: str = "train") -> dict:
    from flax import nnx

    model = trained_decoder(ARTIFACT)
    splits = jb.data.docs_corpus()
    test = jb.data.windows(splits.test, LENGTH)[:64]
    validation = jb.data.windows(splits.validation, LENGTH)[:64]
    pool = jb.data.windows(getattr(splits, calibration), CAL_LENGTH)
    pool = pool[np.random.default_rng(0).permutation(len(pool))][:64]
    batches = [pool[i:i + BATCH] for i in range(0, len(pool), BATCH)]
    graphdef, others = nnx.graphdef(model), nnx.state(model, lambda p, x: not isinstance(x, nnx.Param))
    floats = nnx.state(model, nnx.Param)
    flat_float = dict(zip(jb.tree.paths(floats), jax.tree.leaves(floats)))

    def perplexity(params, windows=test):
        return jb.data.perplexity(nnx.merge(graphdef, jb.leaves.densify(params), others), None, windows)

    @jax.jit
    def calibration_loss(params):
        m = nnx.merge(graphdef, params, others)
        return sum(next_token_loss(m(b), b) for b in batches) / sum(b.size - len(b) for b in batches)

    def with_layers(replaced):  # the float parameters with some kernels replaced (dense)
        flat = {**flat_float, **replaced}
        return jax.tree.unflatten(jax.tree.structure(floats), [flat[p] for p in jb.tree.paths(floats)])

    tokens = sum(b.size - len(b) for b in batches)
    t = time.perf_counter()
    options = jb.recipe.Auto(bits=4.25, choices=CHOICES, folds=folds)
    auto, sens = jb.oneshot.auto(model, None, batches, options, loss=next_token_loss, measured=measured,
                                 progress=False)
    measure_seconds = time.perf_counter() - t
    paths = sorted(sens.weights)
    n = sens.total_weights()
    at = {b: sens.average_bits({p: b for p in paths}) for b in CHOICES}  # uniform widths, scales included

    rows = {"float": {"perplexity": perplexity(floats), "validation_perplexity": perplexity(floats, validation),
                      "bytes": 4 * n, "bpw": 32.0, "widths": "-", "calibration_loss": float(calibration_loss(floats))}}
    compressed, plans, checks = {}, [], {}

    def run(name, recipe):
        plan = [next(r for r in recipe.rules if r.matches(p)).value for p in paths]
        same = [m for k, m in plans if k == plan]
        if same:  # the same plan per layer as an earlier row: measured once
            rows[name] = {**rows[same[0]], "same_as": same[0]}
            return
        out, report = jb.oneshot.compress(model, None, batches, recipe, progress=False)
        flat = dict(zip(jb.tree.paths(out), jax.tree.leaves(out, is_leaf=jb.leaves.is_compressed)))
        kernels = {p: flat[p] for p in paths}
        stored = sum(k.nbytes for k in kernels.values())
        chosen = [k.bits for k in kernels.values()]
        compressed[name] = (kernels, report)
        rows[name] = {"perplexity": perplexity(out), "validation_perplexity": perplexity(out, validation),
                      "bytes": stored, "bpw": 8 * stored / n,
                      "calibration_loss": float(calibration_loss(jb.leaves.densify(out))),
                      "predicted": sens.error({p: k.bits for p, k in kernels.items()}),
                      "widths": ", ".join(f"{chosen.count(b)}x{b}" for b in CHOICES if b in chosen)}
        plans.append((plan, name))
        print(name, rows[name], flush=True)

    def auto_name(b):
        return f"auto at int{b}'s bytes ({at[b]:.4g} bpw)"

    for b in UNIFORM:
        run(f"GPTQ int{b} g128", options.uniform(b))
        if sens.held_out is not None:  # what the held-out check found (calibration folds only)
            check = sens.check(at[b])
            checks[b] = {"uniform": check.uniform, "lowest": check.lowest, "fold": check.fold,
                         "gains_per_token": {k: [g / tokens for g in v] for k, v in check.gains.items()}}
        run(auto_name(b), jb.recipe.auto(sens, jb.recipe.Auto(bits=at[b])))

    # does each score rank the layers by their calibration loss increase alone? (calibration windows only)
    base = rows["float"]["calibration_loss"]
    single, ranks = {}, {}
    for b in (3, 4):
        kernels, report = compressed[f"GPTQ int{b} g128"]
        single[b] = {p: float(calibration_loss(with_layers({p: kernels[p].dense()}))) - base for p in paths}
        output_error = {f"{r.path}/kernel": r.error * r.energy for r in report.rows}
        ranks[b] = {"auto_cost": spearman([sens.errors[p][b] for p in paths], [single[b][p] for p in paths]),
                    "output_error": spearman([output_error[p] for p in paths], [single[b][p] for p in paths]),
                    "sum_of_single / joint": sum(single[b].values()) / (rows[f"GPTQ int{b} g128"]["calibration_loss"]
                                                                         - base)}

    int4, same = rows["GPTQ int4 g128"], rows[auto_name(4)]
    holds = same["perplexity"] < int4["perplexity"] and same["bytes"] <= int4["bytes"]
    source = calibration + " split" + ("" if calibration == "train" else "; the validation perplexity is not held out")
    lines = [f"Trained decoder, {len(paths)} block linears ({n:,} weights), {len(pool)} calibration windows "
             f"(from the {source}) of "
             f"{CAL_LENGTH} ({len(batches)} batches, {folds} folds), {len(validation)} validation and {len(test)} "
             f"test windows of {LENGTH}; measuring {len(CHOICES)} widths took "
             f"{measure_seconds:.0f} s ({len(CHOICES) * folds} engine runs, then "
             f"{'one forward pass per layer and width' if measured else 'one forward + backward pass'} of the "
             "model over the calibration batches). Bits per weight count the scales. Predicted / measured "
             "calibration loss increase (the costs, summed over the layers, over the tokens): " + ", ".join(
                 f"{k} {v['predicted'] / tokens / (v['calibration_loss'] - base):.3f}" for k, v in rows.items()
                 if k != "float") + ".", "",
             "| model | test perplexity | validation perplexity | calibration loss | bytes of the linears | "
             "bits per weight | widths |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['perplexity']:.4f} | {v['validation_perplexity']:.4f} | {v['calibration_loss']:.5f} | "
              f"{v['bytes']:,} | {v['bpw']:.4g} | "
              f"{v['widths']}{' (= ' + v['same_as'] + ')' if 'same_as' in v else ''} |" for k, v in rows.items()]
    if checks:
        lines += ["", "Held-out check (calibration folds only): per lowest width and held-out fold, the calibration "
                  "loss of the widest uniform width within the budget minus that of the allocation among widths "
                  ">= it chosen on the other fold, over all calibration tokens (> 0: the mix is better); the "
                  "recipe is the allocation of the best positive gain, or uniform when none is > 0:", "",
                  "| budget | uniform | gain per lowest width, fold 0 / fold 1 (nats per token) | chosen |",
                  "|---|---|---|---|"]
        for b, c in checks.items():
            chosen = "uniform" if c["lowest"] is None else f"widths >= {c['lowest']}, fold {c['fold']}'s"
            gains = ", ".join(f"{k}: " + " / ".join(f"{g:+.2e}" for g in v) for k, v in c["gains_per_token"].items())
            lines.append(f"| int{b}'s bytes | int{c['uniform']} | {gains} | {chosen} |")
    lines += ["", "Rank correlation (Spearman, over layers) of each score with the calibration loss increase of "
              "quantizing that layer alone; and the sum of those single-layer increases over the increase of "
              "quantizing all layers together (1 = they add up):", "",
              "| bits | auto's cost | output error tr(D^T H D) (before) | sum of single / joint |",
              "|---|---|---|---|"]
    lines += [f"| {b} | {r['auto_cost']:.3f} | {r['output_error']:.3f} | {r['sum_of_single / joint']:.3f} |"
              for b, r in ranks.items()]
    def ratio(b, key):
        return rows[auto_name(b)][key] / rows[f"GPTQ int{b} g128"][key]
    lines += [""] + [f"auto / uniform int{b} perplexity at int{b}'s bytes: test {ratio(b, 'perplexity'):.5f}, "
                     f"validation {ratio(b, 'validation_perplexity'):.5f}" for b in UNIFORM]
    lines += [f"goal ({'holds' if holds else 'does NOT hold'}): auto < uniform int4 in test perplexity at <= its bytes"]
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    name = (("auto_bits_measured" if measured else "auto_bits") + ("" if folds == 2 else f"_folds{folds}")
            + ("" if calibration == "train" else f"_{calibration}_calibration"))
    (HERE / "results" / f"{name}_table.md").write_text("\n".join(lines) + "\n")
    return write(name, ours=same["perplexity"], baseline=int4["perplexity"], unit="ppl",
                 goal="auto (GPTQ 2/3/4/5/6/8 bits per layer, "
                      f"{'measured single-layer loss increase' if measured else 'second-order loss estimate'}) "
                      "< uniform GPTQ int4 g128 in perplexity, at <= its bytes",
                 holds=holds, details={"rows": rows, "rank_correlation": ranks, "held_out_check": checks,
                                       "measure_seconds": round(measure_seconds, 1),
                                       "calibration_windows": len(pool), "test_windows": len(test)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", action="store_true", help="auto measures each cost instead of estimating it")
    parser.add_argument("--folds", type=int, default=2, help="calibration folds of auto (1: in-sample costs, no check)")
    parser.add_argument("--calibration", choices=("train", "validation"), default="train",
                        help="the split the calibration windows come from (the decoder was trained on 'train')")
    args = parser.parse_args()
    main(args.measured, args.folds, args.calibration)
