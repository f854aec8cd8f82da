"""QuaRot-style rotations of a :class:`~jaxopt_big.zoo.Llama`, folded into its weights (Ashkboos et al., 2024).

An orthogonal ``Q`` applied to the residual stream changes no output: RMSNorm only reads ``||x||``,
which ``x Q`` keeps, once the norms' weights are folded into the linears they feed. So

* every RMSNorm weight ``g`` is folded into the rows of the kernels it feeds (q/k/v, gate/up, and the
  LM head) and set to 1;
* the embedding becomes ``E Q``; every kernel that reads the residual stream (q/k/v, gate/up, the head)
  becomes ``Q^T W``; every kernel that writes it (o_proj, down_proj) becomes ``W Q``;
* with ``online_hadamard``, the MLP multiplies its ``down_proj`` input by a Hadamard matrix ``H`` at
  run time (:func:`jaxopt_big.quant.hadamard_transform`) and ``down_proj`` becomes ``H^T W``. The
  config says so (``LlamaConfig.online_hadamard``): ``save_llama`` / ``load_llama`` keep it, and the
  exports that other tools read refuse such a model (they would run it without the Hadamard).
  ``online_hadamard=False`` gives a plain Llama (untied head) that every export can write.

The rotated model computes the same function; a random Hadamard ``Q`` spreads outlier channels of the
residual stream (and heavy-tailed weight rows) over all channels, so per-token activation grids and
per-channel weight grids lose less. A tied model comes back untied: its head ``Q^T diag(g) E^T`` is no
longer the embedding's transpose. The per-head value/output rotation and the online Hadamards of
QuaRot's KV-cache quantization are not applied here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_big import leaves as _leaves
from jaxopt_big import quant as _quant
from jaxopt_big.zoo._llama import Llama

__all__ = ["rotate"]


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 matmul at full precision (TPUs otherwise round float32 operands to bfloat16)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _set(param: nnx.Param, value: jax.Array) -> None:
    param.set_value(value.astype(param.get_value().dtype))


def _value(param: nnx.Param) -> jax.Array:
    return jnp.asarray(param.get_value(), jnp.float32)


def _read_residual(linears: list[nnx.Linear], norm: nnx.RMSNorm, q: jax.Array) -> None:
    """Kernels fed by ``norm``: ``Q^T diag(g) W``; the norm weight becomes 1."""
    scale = norm.scale
    assert scale is not None  # Llama's norms are built with use_scale=True
    g = _value(scale)
    for linear in linears:
        _set(linear.kernel, _mm(q.T, g[..., :, None] * _value(linear.kernel)))
    _set(scale, jnp.ones_like(g))


def _residual_matrix(model: Llama, key: jax.Array | None, rotation: jax.typing.ArrayLike | None) -> jax.Array:
    n = model.config.hidden_size
    if rotation is None:
        if not _quant.hadamard_supported(n):
            raise ValueError(f"rotate: no Hadamard matrix of order hidden_size={n} is built here; pass an "
                             f"orthogonal rotation=, e.g. jax.random.orthogonal(key, {n})")
        return _quant.hadamard(n) if key is None else _quant.random_hadamard(n, key)
    q = jnp.asarray(rotation, jnp.float32)
    if q.shape != (n, n):
        raise ValueError(f"rotate: rotation has shape {q.shape}, expected (hidden_size, hidden_size) = {(n, n)}")
    err = float(jnp.abs(_mm(q, q.T) - jnp.eye(n)).max())
    if not err <= 1e-4:
        raise ValueError(f"rotate: rotation is not orthogonal (max |Q Q^T - I| = {err:.3g} > 1e-4)")
    return q


def rotate(model: Llama, *, key: jax.Array | None = None, rotation: jax.typing.ArrayLike | None = None,
           online_hadamard: bool = True) -> Llama:
    """A copy of ``model`` with its residual stream rotated and its norms folded (same logits).

    Args:
      model: a dense (not yet compressed) :class:`~jaxopt_big.zoo.Llama`, unrolled or scanned.
      key: random signs of QuaRot's randomized Hadamard ``Q = diag(±1) H``; None: the plain ``H``.
      rotation: any orthogonal ``(hidden_size, hidden_size)`` matrix to use as ``Q`` instead (for a
        hidden size with no Hadamard matrix here, e.g. ``jax.random.orthogonal(key, n)``).
      online_hadamard: also rotate ``down_proj``'s input by a Hadamard matrix at run time.

    Returns:
      A new model (``model`` is not changed); float32 logits equal the original's to float rounding.

    Raises:
      ValueError: compressed kernels, an MLP that already runs an online Hadamard, a size with no
        Hadamard matrix, or a ``rotation`` that is misshaped or not orthogonal.

    Examples:
      >>> from jaxopt_big.zoo import LlamaConfig
      >>> c = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      ...                 intermediate_size=48)
      >>> model = Llama(c, rngs=nnx.Rngs(0))
      >>> rotated = rotate(model, key=jax.random.key(1))
      >>> ids = jnp.arange(10).reshape(2, 5)
      >>> bool(jnp.allclose(rotated(ids), model(ids), atol=1e-4))
      True
      >>> float(jnp.abs(rotated.layers[0].input_layernorm.scale.get_value() - 1).max())
      0.0
    """
    if not isinstance(model, Llama):
        raise TypeError(f"rotate expects a jaxopt_big.zoo.Llama, got {type(model).__name__}")
    if _leaves.has_compressed(nnx.state(model, nnx.Param)):
        raise ValueError("rotate: the model holds compressed kernels; rotate the float model, then compress it")
    config = model.config
    q = _residual_matrix(model, key, rotation)
    h = None
    if online_hadamard:
        if not _quant.hadamard_supported(config.intermediate_size):
            raise ValueError(f"rotate: no Hadamard matrix of order intermediate_size={config.intermediate_size} "
                             "is built here; pass online_hadamard=False")
        h = _quant.hadamard(config.intermediate_size)
    if h is not None and config.online_hadamard:
        raise ValueError("rotate: the MLP already runs an online Hadamard (a rotated model); rotate the "
                         "original, or pass online_hadamard=False")
    new = nnx.clone(model)
    layers = list(new.layers) if isinstance(new.layers, nnx.List) else [new.layers]  # scanned: one stacked layer
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        _read_residual([attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm, q)
        _read_residual([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm, q)
        _set(attn.o_proj.kernel, _mm(_value(attn.o_proj.kernel), q))
        down = _value(mlp.down_proj.kernel)
        _set(mlp.down_proj.kernel, _mm(down if h is None else _mm(h.T, down), q))
        if h is not None:
            mlp.online_hadamard = True
    embedding = _value(new.embed_tokens.embedding)
    if new.lm_head is None:  # tied: the head gets its own kernel, E^T before the rotation
        new.lm_head = nnx.data(nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                          param_dtype=new.embed_tokens.embedding.get_value().dtype, rngs=nnx.Rngs(0)))
        _set(new.lm_head.kernel, embedding.T)
    # the config says what the model now computes, so save_llama / load_llama rebuild the same model
    new.config = dataclasses.replace(config, tie_embeddings=False,
                                     online_hadamard=config.online_hadamard or h is not None)
    _read_residual([new.lm_head], new.norm, q)
    _set(new.embed_tokens.embedding, _mm(embedding, q))
    return new

