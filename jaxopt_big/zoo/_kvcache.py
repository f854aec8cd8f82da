"""The preallocated key/value cache a decoder writes while it generates (see :func:`jaxopt_big.zoo.generate`).

One :class:`KVCache` holds every layer's keys and values, stacked along a leading layer axis, in
``length`` slots per sequence: slot ``t`` holds the token at position ``t``. A forward with the cache
writes its tokens at ``index`` and attends to every valid slot up to itself, so a prompt is read once
(prefill) and each new token costs one step over the cache instead of a forward over the whole text.

Keys and values are kept in the model's dtype, or as int8 (:attr:`CacheFormat.INT8`): symmetric absmax
codes with one float32 scale per (sequence, key/value head, slot) vector, 1/4 of a float32 cache plus
one scale per ``head_dim`` values. Attention applies those scales to its scores and probabilities, so
the dequantized cache is never built.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["CacheFormat", "KVCache"]


class CacheFormat(enum.Enum):
    """How a :class:`KVCache` stores keys and values: the model's dtype, or int8 codes with per-vector scales."""

    MODEL = "model"
    INT8 = "int8"


@struct.dataclass
class KVCache:
    """Keys and values of every layer for ``length`` positions, and which positions hold real tokens.

    Attributes:
      keys, values: ``(layers, batch, kv_heads, length, head_dim)`` in the model's dtype, or int8 codes.
      key_scale, value_scale: ``(layers, batch, kv_heads, length)`` float32 scales of int8 codes, else None.
      valid: ``(batch, length)`` bool, True where a slot holds a real (not padding) token.
      index: int32 scalar, the number of slots written so far (the next token's position).

    Examples:
      >>> c = KVCache.empty(layers=2, batch=1, kv_heads=2, length=8, head_dim=4, dtype=jnp.float32,
      ...                   fmt=CacheFormat.INT8)
      >>> c.keys.dtype, c.key_scale.shape, int(c.index)
      (dtype('int8'), (2, 1, 2, 8), 0)
    """

    keys: jax.Array
    values: jax.Array
    key_scale: jax.Array | None
    value_scale: jax.Array | None
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, *, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype: Any,
              fmt: CacheFormat = CacheFormat.MODEL) -> KVCache:
        """A cache with no slot written."""
        if not isinstance(fmt, CacheFormat):
            raise TypeError(f"KVCache format must be a jb.zoo.CacheFormat (MODEL or INT8), got {fmt!r}")
        shape = (layers, batch, kv_heads, length, head_dim)
        quantized = fmt is CacheFormat.INT8
        store = jnp.int8 if quantized else dtype
        scale = jnp.zeros(shape[:-1], jnp.float32) if quantized else None
        return cls(jnp.zeros(shape, store), jnp.zeros(shape, store), scale, scale,
                   jnp.zeros((batch, length), bool), jnp.zeros([], jnp.int32))

    @property
    def length(self) -> int:
        return self.keys.shape[3]

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    def mark(self, attention_mask: jax.Array | None, n: int) -> KVCache:
        """Records which of the ``n`` slots from ``index`` on hold real tokens (all, without a mask)."""
        real = jnp.ones((self.valid.shape[0], n), bool) if attention_mask is None else jnp.asarray(attention_mask) > 0
        return dataclasses.replace(self, valid=jax.lax.dynamic_update_slice(self.valid, real, (0, self.index)))

    def write(self, layer: int | jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Stores layer ``layer``'s keys and values ``(batch, kv_heads, n, head_dim)`` at slots ``index..index+n-1``."""
        at = (layer, 0, 0, self.index, 0)
        put = jax.lax.dynamic_update_slice
        if not self.quantized:
            return dataclasses.replace(self, keys=put(self.keys, k[None].astype(self.keys.dtype), at),
                                       values=put(self.values, v[None].astype(self.values.dtype), at))
        (kq, ks), (vq, vs) = _quantize(k), _quantize(v)
        assert self.key_scale is not None and self.value_scale is not None
        return dataclasses.replace(self, keys=put(self.keys, kq[None], at), values=put(self.values, vq[None], at),
                                   key_scale=put(self.key_scale, ks[None], at[:-1]),
                                   value_scale=put(self.value_scale, vs[None], at[:-1]))

    def read(self, layer: int | jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """Layer ``layer``'s ``(keys, values, key_scale, value_scale)`` over all slots (scales None unless int8)."""
        def pick(a: jax.Array) -> jax.Array:
            return jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
        scales = (None, None) if self.key_scale is None or self.value_scale is None else (
            pick(self.key_scale), pick(self.value_scale))
        return pick(self.keys), pick(self.values), *scales


def _quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of each last-axis vector and its float32 scale (absmax / 127; 1 for a zero vector)."""
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale
