"""Decoder language models of the Llama family (Llama, Qwen2, Mistral) in Flax nnx.

:class:`Llama` follows Hugging Face's ``LlamaForCausalLM``: token embedding, pre-norm decoder blocks
(RMSNorm, grouped-query attention with rotary embeddings, SwiGLU MLP), a final RMSNorm and a language
model head (or the transposed embedding when ``tie_embeddings``). Qwen2 adds q/k/v biases, Mistral a
sliding attention window. Every projection is an ``nnx.Linear`` whose module path mirrors the Hugging
Face tensor name, so rules, interception and quantization select them by name::

    layers/0/self_attn/q_proj/kernel   <->  model.layers.0.self_attn.q_proj.weight (transposed)
    layers/0/mlp/down_proj/kernel      <->  model.layers.0.mlp.down_proj.weight (transposed)
    embed_tokens/embedding             <->  model.embed_tokens.weight
    norm/scale, lm_head/kernel         <->  model.norm.weight, lm_head.weight (transposed)

With ``scan_layers=True`` the blocks are one :class:`DecoderLayer` whose parameters carry a leading
layer axis (``layers/self_attn/q_proj/kernel`` has shape ``(num_layers, hidden, heads * head_dim)``),
run by ``jax.lax.scan``: one compiled block however deep the model, as MaxText and Levanter do.
``jb.oneshot.compress``, ``jb.intercept`` and ``jb.quant.qat`` take it as it is (a stacked layer is
named by its stack's path, ``layers/mlp/up_proj``); ``save_llama`` / ``load_llama`` convert between
the two.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import quant as _quant
from jaxopt_big import tree as _tree
from jaxopt_big.zoo import _families, _safetensors
from jaxopt_big.zoo._kvcache import KVCache

__all__ = ["LlamaConfig", "Llama", "DecoderLayer", "load_llama", "save_llama"]

_MODEL_TYPES = _families.DECODERS
_ONLINE_HADAMARD_KEY = "jaxopt_big_online_hadamard"  # config.json key of LlamaConfig.online_hadamard


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Sizes and variants of a Llama-family decoder.

    Attributes:
      num_kv_heads: key/value heads (grouped-query attention); ``num_heads`` for plain multi-head.
      attention_bias: biases on the q/k/v projections (Qwen2); the output projection has none.
      sliding_window: each token attends to at most this many tokens (itself included), as Mistral;
        None for full causal attention.
      head_dim: per-head width; None resolves to ``hidden_size // num_heads``.
      online_hadamard: every MLP multiplies ``down_proj``'s input by a Hadamard matrix at run time (a
        model rotated by :func:`jaxopt_big.zoo.rotate`). ``config.json`` records it as
        ``jaxopt_big_online_hadamard``, which only our loaders read: other tools would run such a
        checkpoint without the Hadamard, so the exports refuse it.

    Examples:
      >>> c = LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
      ...                 intermediate_size=128)
      >>> c.head_dim, c.model_type
      (16, 'llama')
      >>> LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=3,
      ...             intermediate_size=128)
      Traceback (most recent call last):
      ...
      ValueError: LlamaConfig: num_heads=4 is not divisible by num_kv_heads=3
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    max_positions: int = 2048
    sliding_window: int | None = None
    head_dim: int | None = None
    online_hadamard: bool = False

    def __post_init__(self):
        optional = ("sliding_window", "head_dim")  # None: no window; hidden_size // num_heads
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "max_positions", *optional):
            if f not in optional or getattr(self, f) is not None:
                _checks.store(self, **{f: _checks.integer(f"LlamaConfig.{f}", getattr(self, f), low=1)})
        for f in ("rope_theta", "rms_eps"):
            _checks.store(self, **{f: _checks.number(f"LlamaConfig.{f}", getattr(self, f), above=0)})
        for f in ("tie_embeddings", "attention_bias", "online_hadamard"):
            _checks.store(self, **{f: _checks.flag(f"LlamaConfig.{f}", getattr(self, f))})
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads} (set head_dim)")
        if self.attention_bias and self.sliding_window is not None:
            raise ValueError("LlamaConfig: attention_bias (Qwen2) with sliding_window (Mistral) has no "
                             f"Hugging Face layout; got sliding_window={self.sliding_window}")
        if self.head_dim is None:  # resolved here, so equal configs compare equal however they were written
            _checks.store(self, head_dim=self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: rotary embeddings need an even head_dim, got {self.head_dim}")

    @property
    def model_type(self) -> str:
        """The Hugging Face ``model_type`` whose layout holds these weights."""
        return "qwen2" if self.attention_bias else "mistral" if self.sliding_window is not None else "llama"

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict of model_type llama, qwen2 or mistral.

        Raises:
          ValueError: naming the field and value of anything this model does not implement
            (another model_type, an activation other than SiLU, RoPE scaling, Llama's o_proj/MLP
            biases, Qwen2's per-layer sliding windows).

        Examples:
          >>> LlamaConfig.from_hf({"model_type": "gpt2"})
          Traceback (most recent call last):
          ...
          ValueError: config.json: model_type='gpt2' is not supported (llama, qwen2, mistral)
        """
        kind = config.get("model_type")
        if kind not in _MODEL_TYPES:
            raise ValueError(f"config.json: model_type={kind!r} is not supported ({', '.join(_MODEL_TYPES)})")
        unsupported = {"hidden_act": ("silu",), "rope_scaling": (None,), "mlp_bias": (False,),
                       "attention_bias": (False,) if kind == "llama" else (False, True),
                       "use_sliding_window": (False,)}
        for field, allowed in unsupported.items():
            value = config.get(field, allowed[0])
            if value not in allowed:
                raise ValueError(f"config.json: {field}={value!r} is not supported for model_type={kind!r} "
                                 f"(supported: {list(allowed)})")
        theta = config.get("rope_theta", 10000.0)
        if "rope_parameters" in config:  # newer transformers keep RoPE settings in one dict
            rope = config["rope_parameters"] or {}
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"config.json: rope_parameters.rope_type={rope['rope_type']!r} is not supported "
                                 "(only 'default')")
            theta = rope.get("rope_theta", theta)
        need = functools.partial(_safetensors.required, config)
        heads = need("num_attention_heads")
        return cls(vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                   num_layers=need("num_hidden_layers"), num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads") or heads,
                   intermediate_size=need("intermediate_size"), rope_theta=float(theta),
                   rms_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=config.get("tie_word_embeddings", False),
                   attention_bias=kind == "qwen2", max_positions=config.get("max_position_embeddings", 2048),
                   sliding_window=config.get("sliding_window") if kind == "mistral" else None,
                   head_dim=config.get("head_dim"), online_hadamard=config.get(_ONLINE_HADAMARD_KEY, False))

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict (model_type from :attr:`model_type`)."""
        architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        out = {"model_type": self.model_type, "architectures": [architectures[self.model_type]],
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
               "num_key_value_heads": self.num_kv_heads, "intermediate_size": self.intermediate_size,
               "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_eps,
               "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_positions,
               "hidden_act": "silu", "head_dim": self.head_dim, "torch_dtype": "float32"}
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        if self.online_hadamard:
            out[_ONLINE_HADAMARD_KEY] = True
        return out


def _head_dim(config: LlamaConfig) -> int:
    """``config.head_dim``, which ``LlamaConfig.__post_init__`` always resolves to an int."""
    assert config.head_dim is not None
    return config.head_dim


def _rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``(len(positions), head_dim)`` of Hugging Face Llama's rotary embedding (halves, not pairs)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` for ``x`` of shape ``(batch, length, heads, head_dim)``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _mask_bias(config: LlamaConfig, length: int, attention_mask: jax.Array | None) -> jax.Array:
    """Additive float32 bias ``(batch or 1, 1, 1, length, length)``: causal, windowed, padded keys masked."""
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    keep = k <= q
    if config.sliding_window is not None:  # a no-op while the sequence fits in the window
        keep &= k > q - config.sliding_window
    keep = keep[None]
    if attention_mask is not None:
        keep = keep & (jnp.asarray(attention_mask)[:, None, :] > 0)
    # A finite minimum, not -inf: a fully masked row (a padded query) stays finite instead of NaN.
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]


def _cache_bias(config: LlamaConfig, cache: KVCache, positions: jax.Array) -> jax.Array:
    """``_mask_bias`` for queries at ``positions`` over the cache's slots: causal, windowed, valid slots only."""
    q = positions[:, None]
    k = jnp.arange(cache.length)[None, :]
    keep = k <= q
    if config.sliding_window is not None:
        keep &= k > q - config.sliding_window
    keep = keep[None] & cache.valid[:, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (``q_proj k_proj v_proj o_proj``)."""

    def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        c, d = config, _head_dim(config)
        linear = functools.partial(nnx.Linear, param_dtype=dtype, rngs=rngs)
        self.q_proj = linear(c.hidden_size, c.num_heads * d, use_bias=c.attention_bias)
        self.k_proj = linear(c.hidden_size, c.num_kv_heads * d, use_bias=c.attention_bias)
        self.v_proj = linear(c.hidden_size, c.num_kv_heads * d, use_bias=c.attention_bias)
        self.o_proj = linear(c.num_heads * d, c.hidden_size, use_bias=False)
        self.config = config

    def __call__(self, x: jax.Array, bias: jax.Array, cos: jax.Array, sin: jax.Array, cache: KVCache | None = None,
                 layer: int | jax.Array = 0) -> Any:
        """The attention output; with a ``cache``, ``(output, cache)``: this call's keys and values are
        written to layer ``layer``'s slots from ``cache.index`` on and the queries attend to every slot."""
        c, d = self.config, _head_dim(self.config)
        b, n, _ = x.shape
        kv, groups = c.num_kv_heads, c.num_heads // c.num_kv_heads
        # Query head h reads key/value head h // groups (Hugging Face's repeat_kv order). The groups
        # sharing a key/value head are folded into the query length: one (groups * n, n) matmul per
        # key/value head instead of `groups` small ones.
        q = _rotate(self.q_proj(x).reshape(b, n, c.num_heads, d), cos, sin) * (1.0 / np.sqrt(d)).astype(x.dtype)
        q = q.reshape(b, n, kv, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * n, d)
        k = _rotate(self.k_proj(x).reshape(b, n, kv, d), cos, sin).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, n, kv, d).transpose(0, 2, 1, 3)
        k_scale = v_scale = None
        if cache is not None:
            cache = cache.write(layer, k, v)
            k, v, k_scale, v_scale = cache.read(layer)
        s = k.shape[2]
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k.astype(q.dtype)).astype(jnp.float32)
        if k_scale is not None:  # int8 keys: (q . codes) * scale of each key vector
            scores = scores * k_scale[:, :, None, :]
        scores = scores.reshape(b, kv, groups, n, s) + bias
        # softmax with the normalization applied to the (smaller) output instead of the probabilities
        e = jnp.exp(scores - scores.max(-1, keepdims=True)).reshape(b, kv, groups * n, s)
        weights = e if v_scale is None else e * v_scale[:, :, None, :]  # int8 values: scale each slot's weight
        ctx = jnp.einsum("bkqs,bksd->bkqd", weights.astype(x.dtype), v.astype(x.dtype)) / e.sum(-1, keepdims=True)
        ctx = ctx.astype(x.dtype).reshape(b, kv, groups, n, d).transpose(0, 3, 1, 2, 4)
        out = self.o_proj(ctx.reshape(b, n, c.num_heads * d))
        return out if cache is None else (out, cache)


class MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    ``online_hadamard`` (``LlamaConfig.online_hadamard``, set by :func:`jaxopt_big.zoo.rotate`, which
    folds ``H^T`` into ``down_proj``) multiplies the product by the Hadamard matrix before
    ``down_proj``, so down_proj sees rotated inputs.
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.gate_proj = linear(config.hidden_size, config.intermediate_size)
        self.up_proj = linear(config.hidden_size, config.intermediate_size)
        self.down_proj = linear(config.intermediate_size, config.hidden_size)
        self.online_hadamard = config.online_hadamard

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(_quant.hadamard_transform(h) if self.online_hadamard else h)


class DecoderLayer(nnx.Module):
    """One pre-norm block; ``layer(x, attention_mask=None)`` maps hidden states to hidden states.

    The block computes its own causal mask and rotary tables, so it runs alone on captured inputs
    (as a block-wise one-shot compressor does).
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        norm = functools.partial(nnx.RMSNorm, config.hidden_size, epsilon=config.rms_eps, param_dtype=dtype,
                                 rngs=rngs)
        self.input_layernorm = norm()
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.config = config

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None = None, *, cache: KVCache | None = None,
                 layer: int | jax.Array = 0) -> Any:
        """Hidden states; with a ``cache``, ``(hidden states, cache)``.

        With a cache, ``x`` holds the tokens at positions ``cache.index, cache.index + 1, ...``, they
        attend to the cache's valid slots (``attention_mask`` is ignored: :meth:`KVCache.mark` records
        it), and their keys and values go to the cache's layer ``layer``.
        """
        c = self.config
        if cache is None:
            cos, sin = _rotary(jnp.arange(x.shape[1]), _head_dim(c), c.rope_theta)
            bias = _mask_bias(c, x.shape[1], attention_mask)
            x = x + self.self_attn(self.input_layernorm(x), bias, cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))
        positions = cache.index + jnp.arange(x.shape[1])
        cos, sin = _rotary(positions, _head_dim(c), c.rope_theta)
        h, cache = self.self_attn(self.input_layernorm(x), _cache_bias(c, cache, positions), cos, sin, cache, layer)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """A Llama / Qwen2 / Mistral causal language model.

    ``model(input_ids, attention_mask=None)`` returns logits ``(batch, length, vocab_size)``;
    ``attention_mask`` (1 = real token) masks padded keys. Positions are ``0..length-1``.
    ``model(input_ids, attention_mask, cache=cache)`` (a :class:`KVCache`) reads and extends a
    key/value cache instead, at positions ``cache.index...``, and returns ``(logits, cache)``: what
    :func:`jaxopt_big.zoo.generate` runs. Rotary embeddings depend only on distances, so left padding
    leaves the logits of real tokens as they are without it.

    Args:
      config: the sizes and variant.
      rngs: initialization randomness.
      scan_layers: store the blocks stacked (a leading layer axis on every block parameter) and run
        them with ``jax.lax.scan``; same logits as the unrolled model.
      dtype: parameter dtype.

    Examples:
      >>> c = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      ...                 intermediate_size=48)
      >>> model = Llama(c, rngs=nnx.Rngs(0))
      >>> ids = jnp.arange(10).reshape(2, 5)
      >>> model(ids).shape
      (2, 5, 64)
      >>> model.layers[0].self_attn.k_proj.kernel.shape
      (32, 16)
      >>> stacked = Llama(c, rngs=nnx.Rngs(0), scan_layers=True)
      >>> stacked.layers.self_attn.k_proj.kernel.shape
      (2, 32, 16)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, scan_layers: bool = False, dtype: Any = jnp.float32):
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama expects a LlamaConfig, got {type(config).__name__}")
        self.config, self.scan_layers = config, bool(scan_layers)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, param_dtype=dtype, rngs=rngs)
        self.layers: DecoderLayer | nnx.List[DecoderLayer]  # one stacked layer (scan_layers) or a list
        if scan_layers:
            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(config, dtype=dtype, rngs=rngs)
            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_eps, param_dtype=dtype, rngs=rngs)
        self.lm_head = None if config.tie_embeddings else nnx.Linear(
            config.hidden_size, config.vocab_size, use_bias=False, param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None) -> Any:
        length = input_ids.shape[-1]
        limit = length if cache is None else cache.length
        if limit > self.config.max_positions:
            raise ValueError(f"Llama: sequence length {limit} exceeds max_positions={self.config.max_positions}")
        x = self.embed_tokens(input_ids)
        if cache is not None:
            x, cache = self._cached(x, cache.mark(attention_mask, length))
            cache = dataclasses.replace(cache, index=cache.index + length)
        elif isinstance(self.layers, nnx.List):
            for layer in self.layers:
                x = layer(x, attention_mask)
        else:  # scan_layers: one layer whose parameters are stacked along a leading axis
            graphdef, state = self._stacked()

            def body(h, layer_state):
                return nnx.merge(graphdef, layer_state)(h, attention_mask), None
            x, _ = jax.lax.scan(body, x, state)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits if cache is None else (logits, cache)

    def _stacked(self) -> tuple[Any, Any]:
        graphdef, state = nnx.split(self.layers)
        if _leaves.has_compressed(state):
            raise ValueError("Llama(scan_layers=True) holds compressed block kernels, which a scan cannot "
                             "slice layer by layer: run jb.leaves.densify(state), or the unrolled model "
                             "(save_llama, then load_llama without scan_layers)")
        return graphdef, state

    def _cached(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The blocks over ``x`` with the cache: layer ``i`` reads and writes the cache's layer ``i``."""
        if isinstance(self.layers, nnx.List):
            for i, layer in enumerate(self.layers):
                x, cache = layer(x, cache=cache, layer=i)
            return x, cache
        graphdef, state = self._stacked()

        def body(carry, inputs):
            layer_state, i = inputs
            return nnx.merge(graphdef, layer_state)(carry[0], cache=carry[1], layer=i), None
        (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(self.config.num_layers)))
        return x, cache


# ---------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints

# Tensors a checkpoint may hold that the model recomputes (older Llama checkpoints store RoPE tables).
_DERIVED = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"


def _hf_name(path: str) -> tuple[str, bool]:
    """Unrolled leaf path -> (Hugging Face tensor name, transpose?): torch Linear weights are (out, in)."""
    *module, leaf = path.split("/")
    prefix = "" if module[0] == "lm_head" else "model."
    return prefix + ".".join(module) + (".bias" if leaf == "bias" else ".weight"), leaf == "kernel"


def _abstract(config: LlamaConfig, scan_layers: bool, dtype: Any) -> Llama:
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), scan_layers=scan_layers, dtype=dtype))


def _layer_paths(path: str, config: LlamaConfig, scanned: bool) -> list[str] | None:
    """The unrolled paths a stacked block parameter stands for (one per layer), or None if not stacked."""
    if scanned and path.startswith("layers/"):
        return [f"layers/{i}/{path[len('layers/'):]}" for i in range(config.num_layers)]
    return None


def load_llama(directory: str | pathlib.Path, *, scan_layers: bool = False, dtype: Any = jnp.float32,
               lazy: bool = False) -> Llama:
    """Reads a Hugging Face Llama / Qwen2 / Mistral checkpoint into an nnx :class:`Llama`.

    ``directory`` holds ``config.json`` and either ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` with its shards (the single file wins when both are there, as in
    ``transformers``); tensors are read one at a time and cast to ``dtype``. A tied model may also
    store ``lm_head.weight`` (ignored).

    With ``lazy=True`` (unrolled layers only) no tensor is read: each is a
    :class:`~jaxopt_big.zoo.Lazy` handle (shape and dtype from the file's header) that
    ``jb.oneshot.compress`` reads when it reaches the layer (the embeddings: while it captures the
    first layer's inputs; the final norm and head: when it returns them), so a checkpoint bigger than
    memory compresses one float layer at a time.

    Raises:
      FileNotFoundError: a file is missing. ValueError (one line naming the file, field or tensor): an
        unsupported or missing config field, an unreadable safetensors file or index, a missing,
        misshaped or non-floating tensor (naming its model path), or a tensor the model has no place for.

    Examples:
      >>> import tempfile
      >>> c = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      ...                 intermediate_size=48)
      >>> model = Llama(c, rngs=nnx.Rngs(0))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_llama(d, model)
      ...     loaded = load_llama(d, scan_layers=True)
      >>> ids = jnp.arange(8).reshape(1, 8)
      >>> bool(jnp.allclose(loaded(ids), model(ids), atol=1e-5))
      True
    """
    directory = pathlib.Path(directory)
    config = LlamaConfig.from_hf(_safetensors.read_config(directory))
    if lazy and scan_layers:
        raise ValueError("load_llama: lazy=True reads unrolled layers one at a time; it cannot stack them "
                         "(scan_layers=True)")
    checkpoint = _safetensors.Checkpoint(directory, ignored=[_DERIVED, "lm_head.weight"] if config.tie_embeddings
                                         else [_DERIVED])
    graphdef, state = nnx.split(_abstract(config, scan_layers, dtype))

    def tensor(path: str, shape: tuple[int, ...]) -> np.ndarray:
        name, transpose = _hf_name(path)
        value = checkpoint.get(name, path)
        value = value.T if transpose else value
        if value.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {value.shape} (transposed: {transpose}), "
                             f"expected {shape}")
        return value

    def read(path: str, like: jax.ShapeDtypeStruct) -> Any:
        if lazy:
            name, transpose = _hf_name(path)
            return checkpoint.lazy(name, path, tuple(like.shape), transpose, dtype)
        layers = _layer_paths(path, config, scan_layers)
        if layers is None:
            return jnp.asarray(tensor(path, tuple(like.shape)), dtype)
        return jnp.asarray(np.stack([tensor(p, tuple(like.shape[1:])) for p in layers]), dtype)

    pure = _tree.map_with_path(read, nnx.to_pure_dict(state))
    checkpoint.check_all_used()
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def save_llama(directory: str | pathlib.Path, model: Llama) -> None:
    """Writes ``model`` as Hugging Face ``config.json`` + ``model.safetensors`` (float32).

    Compressed kernels (``QArray``...) are written as their dense values; stacked (scanned) blocks are
    written one tensor per layer, so the directory is the same whether the model was scanned or not.
    A sharded checkpoint already in ``directory`` (its index and the shards it lists) is removed, so
    the folder holds one model. The inverse of :func:`load_llama` (see its example).
    """
    if not isinstance(model, Llama):
        raise TypeError(f"save_llama expects a jaxopt_big.zoo.Llama, got {type(model).__name__}")
    config = model.config
    directory = pathlib.Path(directory)
    pure = _leaves.densify(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {}
    for path, value in zip(_tree.paths(pure), jax.tree.leaves(pure)):
        value = np.asarray(value, np.float32)
        layers = _layer_paths(path, config, model.scan_layers)
        for layer_path, v in zip(layers, value) if layers is not None else [(path, value)]:
            name, transpose = _hf_name(layer_path)
            tensors[name] = np.ascontiguousarray(v.T if transpose else v)
    _safetensors.write(directory, tensors)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
