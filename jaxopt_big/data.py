"""Embedded datasets and batching.

Two datasets ship with what is installed, so nothing is downloaded:

* scikit-learn's digits (1797 8×8 images, 10 classes), inside the scikit-learn wheel;
* English text: the standard library's ``pydoc_data.topics`` (about 465 KB of Python reference
  documentation), byte-tokenized, with fixed train / validation / test splits, for language models::

      splits = jb.data.docs_corpus()                  # TextSplits of int32 byte ids
      train = jb.data.lm_dataset(splits.train, 256)   # Dataset(x=inputs, y=next tokens) for jb.train.fit
      ppl = jb.data.perplexity(model, None, jb.data.windows(splits.validation, 256))
"""

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_big import _checks

__all__ = ["Dataset", "digits", "holdout_split", "batches", "VOCAB_SIZE", "encode", "decode", "docs_text",
           "TextSplits", "docs_corpus", "windows", "token_batches", "lm_dataset", "perplexity"]


class Dataset(NamedTuple):
    """Inputs and integer labels, as numpy arrays (host memory until batched)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx) -> "Dataset":
        return Dataset(self.x[idx], self.y[idx])


def digits(*, flat: bool = False) -> Dataset:
    """scikit-learn digits scaled to [0, 1]: images ``(1797, 8, 8, 1)`` or flat ``(1797, 64)``.

    Examples:
      >>> ds = digits()
      >>> ds.x.shape, ds.y.shape, float(ds.x.max())
      ((1797, 8, 8, 1), (1797,), 1.0)
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images / 16.0).astype(np.float32)
    x = x.reshape(len(x), -1) if flat else x[..., None]
    return Dataset(x, raw.target.astype(np.int32))


def holdout_split(ds: Dataset, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Stratified, seeded split into (train, test): each class keeps its share in both parts.

    Examples:
      >>> train, test = holdout_split(digits(), test_fraction=0.25)
      >>> len(train) + len(test), abs(len(test) - 0.25 * 1797) < 10
      (1797, True)
    """
    test_fraction = _checks.fraction("test_fraction", test_fraction, open_low=True)
    rng = np.random.default_rng(_checks.integer("holdout_split.seed", seed, low=0))
    test_idx = []
    for c in np.unique(ds.y):
        members = rng.permutation(np.flatnonzero(ds.y == c))
        test_idx.append(members[: int(round(test_fraction * len(members)))])
    test_mask = np.zeros(len(ds), bool)
    test_mask[np.concatenate(test_idx)] = True
    return ds.take(np.flatnonzero(~test_mask)), ds.take(np.flatnonzero(test_mask))


def batches(ds: Dataset, batch_size: int, *, key: jax.Array | None = None,
            drop_remainder: bool = False) -> Iterator[Dataset]:
    """Yields batches; shuffled by ``key`` (explicit PRNG), in order when ``key`` is None.

    Examples:
      >>> ds = Dataset(np.arange(10), np.arange(10))
      >>> [len(b) for b in batches(ds, 4)]
      [4, 4, 2]
      >>> [len(b) for b in batches(ds, 4, key=jax.random.key(0), drop_remainder=True)]
      [4, 4]
    """
    batch_size = _checks.integer("batch_size", batch_size, low=1)
    n = len(ds)
    order = np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        yield ds.take(order[start:start + batch_size])


# ---------------------------------------------------------------------------------------------------------
# Text: Python's own documentation, byte-level tokens

VOCAB_SIZE = 256  # one id per byte of UTF-8
_BLOCK = 4096     # split granularity (bytes): small enough that every split samples every part of the text


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as int32 token ids in ``[0, 256)``.

    Examples:
      >>> encode("hé").tolist()
      [104, 195, 169]
      >>> decode(encode("hé"))
      'hé'
    """
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids: Any) -> str:
    """Token ids back to text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"decode: token ids must be in [0, {VOCAB_SIZE}), got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def docs_text() -> str:
    """The English text of ``pydoc_data.topics``: every topic, in sorted order, separated by blank lines.

    The text is that of the running Python version (about 465 KB for 3.11).
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


class TextSplits(NamedTuple):
    """Token ids (int32, 1-D) of the training, validation and test text."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def docs_corpus() -> TextSplits:
    """:func:`docs_text` byte-tokenized and split 90 / 5 / 5 into train / validation / test.

    The text is cut into 4096-byte blocks; block ``i`` goes to validation when ``i % 20 == 9``, to
    test when ``i % 20 == 19`` and to train otherwise. The splits are disjoint, cover the text, and
    are fixed (no randomness); each spreads over the whole documentation.

    Examples:
      >>> s = docs_corpus()
      >>> len(s.train) > 15 * len(s.validation) > 0, sum(map(len, s)) == len(encode(docs_text()))
      (True, True)
    """
    ids = encode(docs_text())
    block = np.arange(len(ids)) // _BLOCK % 20
    return TextSplits(ids[(block != 9) & (block != 19)], ids[block == 9], ids[block == 19])


def windows(tokens: Any, length: int) -> np.ndarray:
    """Non-overlapping windows ``(len(tokens) // length, length)`` of a 1-D token array (the tail is dropped).

    Examples:
      >>> windows(np.arange(7), 3).tolist()
      [[0, 1, 2], [3, 4, 5]]
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"windows expects 1-D tokens, got shape {tokens.shape}")
    if not isinstance(length, int) or length < 1 or length > len(tokens):
        raise ValueError(f"window length must be an int in [1, {len(tokens)}], got {length!r}")
    n = len(tokens) // length
    return tokens[: n * length].reshape(n, length)


def token_batches(tokens: Any, batch_size: int, length: int, *, key: jax.Array | None = None) -> Iterator[np.ndarray]:
    """Yields ``(batch_size, length)`` int32 batches of :func:`windows`, shuffled by ``key`` (in order if None).

    Only full batches are yielded, so a jitted consumer compiles once.

    Examples:
      >>> [b.shape for b in token_batches(np.arange(100), 2, 10)]
      [(2, 10), (2, 10), (2, 10), (2, 10), (2, 10)]
    """
    ds = Dataset(windows(tokens, length), np.zeros(len(tokens) // length, np.int32))
    for batch in batches(ds, batch_size, key=key, drop_remainder=True):
        yield batch.x


def lm_dataset(tokens: Any, length: int) -> Dataset:
    """Next-token pairs for :func:`jaxopt_big.train.fit`: ``x`` windows of ``length`` tokens, ``y`` shifted by one.

    Windows of ``length + 1`` tokens do not overlap.

    Examples:
      >>> ds = lm_dataset(np.arange(9), 3)
      >>> ds.x.tolist(), ds.y.tolist()
      ([[0, 1, 2], [4, 5, 6]], [[1, 2, 3], [5, 6, 7]])
    """
    w = windows(tokens, length + 1)
    return Dataset(w[:, :-1], w[:, 1:])


def _next_token_nll(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token negative log-likelihoods where context and target are real, and their count."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    real = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    return jnp.where(real, nll, 0.0).sum(), real.sum()


def perplexity(fn: Any, params: Any, tokens: Any, *, attention_mask: Any = None, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the real tokens of ``tokens``.

    Args:
      fn: a model returning logits ``(batch, length, vocab)``: an nnx module or a function called as
        ``fn(ids)`` when ``params`` is None, else a function called as ``fn(params, ids)`` (a linen
        ``model.apply``). With ``attention_mask`` the mask is passed as one more argument.
      params: the parameters for ``fn``, or None.
      tokens: int ids ``(sequences, length)``, e.g. from :func:`windows`.
      attention_mask: ``(sequences, length)``, 1 = real token. Position ``t`` predicts token ``t + 1``
        and counts only when both are real.
      batch_size: sequences per forward pass (the last batch is padded, so the forward compiles once).

    Examples:
      >>> uniform = lambda ids: jnp.zeros((*ids.shape, VOCAB_SIZE))
      >>> round(perplexity(uniform, None, windows(encode("some text here"), 7)), 3)
      256.0
    """
    ids = np.asarray(tokens)
    if ids.ndim != 2 or ids.shape[1] < 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"perplexity: tokens must be integer ids (sequences, length >= 2), got {ids.dtype} {ids.shape}")
    mask = np.ones_like(ids, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"perplexity: attention_mask shape {mask.shape} differs from tokens {ids.shape}")
    if isinstance(fn, nnx.Module):  # parameters as arguments, not constants baked into the program
        graphdef, params = nnx.split(fn)
        call = lambda p, *a: nnx.merge(graphdef, p)(*a)  # noqa: E731
    else:
        call = (lambda _, *a: fn(*a)) if params is None else fn
    with_mask = attention_mask is not None

    @jax.jit
    def stats(p, ids, mask):
        logits = call(p, ids, mask) if with_mask else call(p, ids)
        return _next_token_nll(logits, ids, mask)

    pad = -len(ids) % batch_size
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        s, c = stats(params, jnp.asarray(ids[start:start + batch_size]), jnp.asarray(mask[start:start + batch_size]))
        total, count = total + float(s), count + int(c)
    if count == 0:
        raise ValueError("perplexity: no token has a real predecessor (all masked, or length < 2)")
    return math.exp(total / count)
