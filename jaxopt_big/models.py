"""Small reference models in linen and nnx, with Flax default parameter names.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> model = CNN()
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> sorted(variables["params"])
  ['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from flax import nnx

__all__ = ["MLP", "CNN", "Transformer", "NnxMLP", "NnxCNN"]


class MLP(nn.Module):
    """Flattens its input, then Dense + ReLU layers and a Dense classifier."""

    features: Sequence[int] = (128, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for f in self.features:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Conv(3×3) + ReLU layers (optional BatchNorm), 2×2 average pooling, Dense head.

    With ``batch_norm=True`` call with ``train=True`` and ``mutable=["batch_stats"]`` while training.
    """

    features: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for f in self.features:
            x = nn.Conv(f, (3, 3))(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class _Block(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.dim)(h)


class Transformer(nn.Module):
    """Tiny pre-norm transformer classifier over a sequence of feature vectors.

    Images ``(N, H, W, C)`` are read as ``H`` tokens of ``W·C`` features; flat inputs ``(N, D)``
    as ``tokens`` tokens of ``D / tokens`` features.
    """

    dim: int = 64
    depth: int = 2
    heads: int = 4
    tokens: int = 8
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], x.shape[1], -1) if x.ndim > 2 else x.reshape(x.shape[0], self.tokens, -1)
        x = nn.Dense(self.dim)(x)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        for _ in range(self.depth):
            x = _Block(self.dim, self.heads)(x)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x).mean(axis=1))


class NnxMLP(nnx.Module):
    """nnx twin of :class:`MLP`; layers are ``layers/0``, ``layers/1``, ...

    Examples:
      >>> import jax.numpy as jnp
      >>> NnxMLP(64, rngs=nnx.Rngs(0))(jnp.zeros((2, 64))).shape
      (2, 10)
    """

    def __init__(self, in_features: int, features: Sequence[int] = (128, 128), num_classes: int = 10,
                 *, rngs: nnx.Rngs):
        sizes = [in_features, *features, num_classes]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


class NnxCNN(nnx.Module):
    """nnx twin of :class:`CNN` (no BatchNorm) for ``(N, 8, 8, C)`` inputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> NnxCNN(rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    def __init__(self, in_channels: int = 1, features: Sequence[int] = (32, 64), hidden: int = 128,
                 num_classes: int = 10, image_size: int = 8, *, rngs: nnx.Rngs):
        chans = [in_channels, *features]
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(chans[:-1], chans[1:])])
        flat = (image_size // 2) ** 2 * chans[-1]
        self.hidden = nnx.Linear(flat, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = nnx.relu(conv(x))
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.hidden(x)))


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> count_params({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
      10
    """
    return sum(int(x.size) for x in jax.tree.leaves(tree))
