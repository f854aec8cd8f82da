"""Trains the small Llama that the decoder benchmarks compress, on Python's own documentation.

A byte-level Llama (hidden 256, 4 blocks, 4 query / 2 key-value heads, SwiGLU 768, context 256) is
trained from scratch on the train split of :func:`jaxopt_big.data.docs_corpus` with the library's own
machinery (``jb.train.make_step`` + ``jb.train.fit``, AdamW with warmup and cosine decay), on CPU in a
few minutes. It reports held-out perplexity beside the unigram (byte-frequency) baseline and saves the
model with :func:`jaxopt_big.zoo.save_llama` to ``benchmarks/artifacts/decoder/`` (git-ignored).

Other benchmarks call :func:`trained_decoder`, which loads that directory or trains it first.
Run: ``python benchmarks/train_decoder.py [--quick] [--retrain]``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jaxopt_big as jb  # noqa: E402
from common import write  # noqa: E402

ARTIFACT = HERE / "artifacts" / "decoder"
# intermediate 768 = 6 x 128: group-128 quantization fits every linear
CONFIG = jb.zoo.LlamaConfig(vocab_size=jb.data.VOCAB_SIZE, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=768, max_positions=256)
LENGTH = 256      # training and evaluation context
BATCH = 8
EPOCHS = 1        # one pass over the ~420 KB of training text: 204 steps of 2048 tokens
PEAK_LR = 3e-3


def _loss(graphdef):
    def loss_fn(params, batch):
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {}
    return loss_fn


def train(directory: pathlib.Path = ARTIFACT, *, epochs: int = EPOCHS, fraction: float = 1.0, seed: int = 0) -> dict:
    """Trains the decoder on ``fraction`` of the training windows, saves it to ``directory``, returns its record."""
    splits = jb.data.docs_corpus()
    train_set = jb.data.lm_dataset(splits.train, LENGTH)
    train_set = train_set.take(slice(0, int(fraction * len(train_set))))
    graphdef, params = nnx.split(jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(seed)))
    steps = epochs * (len(train_set) // BATCH)
    schedule = optax.warmup_cosine_decay_schedule(0.0, PEAK_LR, max(1, steps // 10), steps, PEAK_LR / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.1))
    step = jb.train.make_step(_loss(graphdef), tx)
    start = time.perf_counter()
    state, history = jb.train.fit(step, jb.train.TrainState.create(params, tx), train_set, epochs=epochs,
                                  batch_size=BATCH, key=jax.random.key(seed), desc="decoder")
    seconds = time.perf_counter() - start
    model = nnx.merge(graphdef, state.params)
    record = {"epochs": epochs, "fraction": fraction, "steps": steps, "batch": BATCH, "length": LENGTH, "train_seconds": round(seconds, 1),
              "train_loss": [round(h["loss"], 4) for h in history],
              "validation_perplexity": jb.data.perplexity(model, None, jb.data.windows(splits.validation, LENGTH)),
              "parameters": sum(x.size for x in jax.tree.leaves(state.params))}
    jb.zoo.save_llama(directory, model)
    (directory / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def trained_decoder(directory: pathlib.Path = ARTIFACT, *, scan_layers: bool = False) -> jb.zoo.Llama:
    """The trained decoder: loaded from ``directory``, trained there first if it is not yet saved."""
    if not (directory / "training.json").exists():
        train(directory)
    return jb.zoo.load_llama(directory, scan_layers=scan_layers)


def unigram_perplexity(train_tokens: np.ndarray, tokens: np.ndarray) -> float:
    """Perplexity of next-token prediction by byte frequency alone (add-one smoothed)."""
    counts = np.bincount(train_tokens, minlength=jb.data.VOCAB_SIZE) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[tokens[:, 1:]].mean())


def main(quick: bool, retrain: bool) -> None:
    directory = ARTIFACT.with_name("decoder_quick") if quick else ARTIFACT
    if retrain or not (directory / "training.json").exists():
        train(directory, fraction=0.25 if quick else 1.0)
    record = json.loads((directory / "training.json").read_text())
    splits = jb.data.docs_corpus()
    baseline = unigram_perplexity(splits.train, jb.data.windows(splits.validation, LENGTH))
    ours = record["validation_perplexity"]
    write("train_decoder", ours=ours, baseline=baseline, unit="ppl", goal="validation perplexity <= 0.5x unigram",
          holds=ours <= 0.5 * baseline, details={**record, "config": CONFIG.to_hf(), "artifact": str(directory)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a quarter of the text, saved to artifacts/decoder_quick")
    parser.add_argument("--retrain", action="store_true", help="train even if the artifact exists")
    args = parser.parse_args()
    main(args.quick, args.retrain)
