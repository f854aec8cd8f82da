"""Text generation with a key/value cache: one jitted prefill, then a jitted decode loop.

:func:`generate` pads the prompts of a batch to a length bucket (so prompts of nearby lengths share one
compiled program), reads them once into a preallocated :class:`~jaxopt_big.zoo.KVCache` of
``bucket + max_new_tokens`` slots, and generates inside one ``lax.while_loop``: each step runs the
model on one token per sequence against the cache. Compressed kernels (``QArray`` int8/int4,
``PackedSparse``, ``LowRank``...) run through :func:`jaxopt_big.intercept.run_compressed`, so a
quantized model generates from its packed weights; int8 and int4 kernels are first re-arranged into
the decode layout (:func:`jaxopt_big.quant.decode_layout`: the same bytes, each output's codes contiguous).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_big import _checks
from jaxopt_big import intercept as _intercept
from jaxopt_big import leaves as _leaves
from jaxopt_big import quant as _quant
from jaxopt_big.zoo._kvcache import CacheFormat, KVCache
from jaxopt_big.zoo._llama import Llama

__all__ = ["Generation", "generate"]


@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns.

    Attributes:
      tokens: ``(batch, max_new_tokens)`` int32 new token ids; after ``eos_id`` a row repeats it.
      logits: ``(batch, max_new_tokens, vocab)`` float32 logits each token was chosen from (before
        temperature and filtering), with ``return_logits=True``; else None.
      prompt_length: the bucketed prompt length the program was compiled for.
      compile_seconds, prefill_seconds, decode_seconds: wall time of compiling (near 0 when the
        programs are cached), of reading the prompts, and of the decode loop.
    """

    tokens: np.ndarray
    logits: jax.Array | None
    prompt_length: int
    compile_seconds: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of the decode loop (all sequences of the batch together)."""
        steps = self.tokens.shape[1] - 1  # the first token comes from the prefill's logits
        return self.tokens.shape[0] * steps / max(self.decode_seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None


def generate(model: Llama, params: Any, prompt_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             key: jax.Array | None = None, kv_cache: CacheFormat = CacheFormat.MODEL, eos_id: int | None = None,
             bucket: int = 64, return_logits: bool = False) -> Generation:
    """Generates ``max_new_tokens`` tokens after each prompt of a batch.

    Greedy by default (``temperature=0``: each token is the argmax of the logits). With a
    ``temperature > 0`` tokens are sampled from ``softmax(logits / temperature)``, restricted to the
    ``top_k`` most likely tokens and/or the smallest set whose probability reaches ``top_p``, with
    randomness from ``key`` only.

    Args:
      model: a :class:`~jaxopt_big.zoo.Llama` (unrolled or ``scan_layers``; its weights may be
        abstract, as :func:`jaxopt_big.hf.load_compressed` builds it, when ``params`` are given).
      params: the model's parameters as an ``nnx.State`` (compressed leaves allowed), or None for
        the model's own. Int8/int4 ``QArray`` kernels are re-arranged for the decode loop
        (:func:`jaxopt_big.quant.decode_layout`) on each call; params arranged beforehand skip that
        and keep one copy of the weights in memory.
      prompt_ids: ``(batch, length)`` (or ``(length,)``) integer token ids.
      max_new_tokens: tokens to generate per sequence.
      attention_mask: ``prompt_ids``-shaped, 1 for real tokens and 0 for padding, on either side;
        each row's real tokens, in order, are its prompt. None: every token is real.
      temperature, top_k, top_p, key: sampling (see above); ``key`` is required when sampling.
      kv_cache: :attr:`CacheFormat.MODEL` (keys and values in the model's dtype) or
        :attr:`CacheFormat.INT8` (int8 codes with a scale per token and head).
      eos_id: stop a sequence at this token (the loop ends when every sequence has); None: never.
      bucket: prompts are padded to a multiple of this, so lengths within a bucket share one program.
      return_logits: also return every step's logits.

    Raises:
      TypeError, ValueError: naming the argument and the value (a prompt longer than the model's
        ``max_positions`` with the new tokens, an empty row, token ids outside the vocabulary...).

    Examples:
      >>> from jaxopt_big.zoo import LlamaConfig
      >>> c = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      ...                 intermediate_size=48)
      >>> model = Llama(c, rngs=nnx.Rngs(0))
      >>> out = generate(model, None, [[5, 6, 7]], max_new_tokens=4)
      >>> out.tokens.shape
      (1, 4)
      >>> full = model(jnp.array([[5, 6, 7, *out.tokens[0, :3]]]))   # no cache: the same greedy choices
      >>> bool((full[0, 2:].argmax(-1) == out.tokens[0]).all())
      True
    """
    if not isinstance(model, Llama):
        raise TypeError(f"generate expects a jaxopt_big.zoo.Llama, got {type(model).__name__}")
    config = model.config
    new = _checks.integer("max_new_tokens", max_new_tokens, low=1)
    bucket = _checks.integer("bucket", bucket, low=1)
    if not isinstance(kv_cache, CacheFormat):
        raise TypeError(f"kv_cache must be a jb.zoo.CacheFormat (MODEL or INT8), got {kv_cache!r}")
    sampling = _sampling(temperature, top_k, top_p, key)
    rows = _prompts(prompt_ids, attention_mask, config.vocab_size)
    longest = max(len(r) for r in rows)
    if longest + new > config.max_positions:
        raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens={new} exceeds the model's "
                         f"max_positions={config.max_positions}")
    width = min(-(-longest // bucket) * bucket, config.max_positions - new)
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):  # left padding: every prompt ends at the last slot
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1

    graphdef, state = _split(model, params)
    key = jax.random.key(0) if key is None else key  # unused when greedy
    start = time.perf_counter()
    prefill = _prefill.lower(graphdef, state, ids, mask, fmt=kv_cache, total=width + new).compile()
    logits_shape, cache_shape = prefill.out_info
    decode = _decode.lower(graphdef, state, cache_shape, logits_shape, key, steps=new, sampling=sampling,
                           eos_id=eos_id, with_logits=bool(return_logits)).compile()
    compiled = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(state, ids, mask))
    prefilled = time.perf_counter()
    tokens, all_logits = jax.block_until_ready(decode(state, cache, logits, key))
    done = time.perf_counter()
    return Generation(np.asarray(tokens), all_logits, width, compiled - start, prefilled - compiled, done - prefilled)


def _sampling(temperature: Any, top_k: Any, top_p: Any, key: Any) -> _Sampling:
    temperature = _checks.number("temperature", temperature, low=0)
    top_k = None if top_k is None else _checks.integer("top_k", top_k, low=1)
    top_p = None if top_p is None else _checks.fraction("top_p", top_p, closed=True, open_low=True)
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(f"top_k={top_k} / top_p={top_p} need sampling (temperature > 0); temperature=0 is greedy")
    if temperature > 0 and key is None:
        raise ValueError(f"sampling (temperature={temperature}) needs an explicit key=jax.random.key(...)")
    return _Sampling(temperature, top_k, top_p)


def _prompts(prompt_ids: Any, attention_mask: Any, vocab: int) -> list[np.ndarray]:
    """Each row's real tokens, checked."""
    ids = np.asarray(prompt_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be a (batch, length) integer array, got shape {ids.shape} dtype {ids.dtype}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) > 0
    mask = mask[None] if mask.ndim == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, prompt_ids {ids.shape}")
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} have no real token")
    bad = ids[mask][(ids[mask] < 0) | (ids[mask] >= vocab)]
    if bad.size:
        raise ValueError(f"prompt_ids: token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
    return [r[m] for r, m in zip(ids, mask)]


def _split(model: Llama, params: Any) -> tuple[Any, Any]:
    graphdef, own, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # nnx types it variadic
    if params is not None and not isinstance(params, nnx.State):
        raise TypeError(f"params must be an nnx.State (e.g. nnx.state(model, nnx.Param)) or None, "
                        f"got {type(params).__name__}")
    # int8/int4 kernels re-arranged once for the decode steps (same bytes), not in every step
    return graphdef, nnx.merge_state(_quant.decode_layout(own if params is None else params), rest)


@functools.partial(jax.jit, static_argnames=("graphdef", "fmt", "total"))
def _prefill(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, *, fmt: CacheFormat,
             total: int) -> tuple[jax.Array, KVCache]:
    """The last prompt position's logits (float32) and a cache of ``total`` slots holding the prompt."""
    model = nnx.merge(graphdef, state)
    c = model.config
    dtype = nnx.to_pure_dict(state)["embed_tokens"]["embedding"].dtype  # the hidden states' dtype
    cache = KVCache.empty(layers=c.num_layers, batch=ids.shape[0], kv_heads=c.num_kv_heads, length=total,
                          head_dim=c.head_dim, dtype=dtype, fmt=fmt)
    logits, cache = _runner(model, state)(ids, mask, cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "sampling", "eos_id", "with_logits"))
def _decode(graphdef: Any, state: Any, cache: KVCache, logits: jax.Array, key: jax.Array, *, steps: int,
            sampling: _Sampling, eos_id: int | None, with_logits: bool) -> tuple[jax.Array, jax.Array | None]:
    """``steps`` tokens: the first from the prefill's ``logits``, each next one from a step over the cache."""
    run = _runner(nnx.merge(graphdef, state), state)
    batch = logits.shape[0]
    first = _pick(logits, key, 0, sampling)
    tokens = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first)
    seen = jnp.zeros((batch, steps, logits.shape[-1]) if with_logits else (0,), jnp.float32)
    seen = seen.at[:, 0].set(logits) if with_logits else seen
    done = jnp.zeros(batch, bool) if eos_id is None else first == eos_id

    def more(carry):
        i, _, _, _, done = carry
        return (i < steps) & ~done.all()

    def step(carry):
        i, cache, tokens, seen, done = carry
        last = tokens[:, i - 1]
        out, cache = run(last[:, None], cache=cache)
        out = out[:, 0].astype(jnp.float32)
        token = _pick(out, key, i, sampling)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        seen = seen.at[:, i].set(out) if with_logits else seen
        return i + 1, cache, tokens.at[:, i].set(token), seen, done

    i, _, tokens, seen, _ = jax.lax.while_loop(more, step, (jnp.int32(1), cache, tokens, seen, done))
    if eos_id is not None:  # rows stopped early: the rest of the buffer repeats eos_id
        tokens = jnp.where(jnp.arange(steps)[None] < i, tokens, eos_id)
    return tokens, (seen if with_logits else None)


def _runner(model: Llama, state: Any) -> Any:
    """The model, running compressed kernels through their execution hooks when it has any."""
    return _intercept.run_compressed(model) if _leaves.has_compressed(state) else model


def _pick(logits: jax.Array, key: jax.Array, step: Any, sampling: _Sampling) -> jax.Array:
    """The next token of each row: the argmax, or a sample from the filtered, tempered distribution."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / sampling.temperature
    low = jnp.finfo(jnp.float32).min
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, low, logits)
    if sampling.top_p is not None:  # keep the most likely tokens until their probability reaches top_p
        ordered = jnp.sort(logits, -1)[:, ::-1]
        probs = jax.nn.softmax(ordered, -1)
        before = jnp.cumsum(probs, -1) - probs  # probability of the more likely tokens
        cut = jnp.min(jnp.where(before < sampling.top_p, ordered, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cut, low, logits)
    return jax.random.categorical(jax.random.fold_in(key, step), logits).astype(jnp.int32)
