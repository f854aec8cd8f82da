"""Sub-integer and float weight formats: binary, ternary and float8, with packed storage.

``pack_bits``/``unpack_bits`` store small unsigned codes (1 to 16 bits each) back to back in a
``uint8`` buffer, so an array of ``n`` codes of ``b`` bits really takes ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pack_bits", "unpack_bits"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"packed code width must be an int in [1, 16], got {bits!r}")


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned integer codes of ``bits`` bits each into a flat ``uint8`` buffer.

    Args:
      codes: integer array with values in ``[0, 2**bits)`` (any shape; read flattened).
      bits: width of one code.

    Returns:
      ``uint8`` array of ``ceil(codes.size * bits / 8)`` bytes.

    Examples:
      >>> import jax.numpy as jnp
      >>> packed = pack_bits(jnp.array([1, 2, 3, 0, 1]), 2)
      >>> packed.shape, unpack_bits(packed, 2, 5).tolist()
      ((2,), [1, 2, 3, 0, 1])
    """
    _check_bits(bits)
    flat = codes.reshape(-1).astype(jnp.uint32)
    bitplanes = (flat[:, None] >> jnp.arange(bits, dtype=jnp.uint32)) & 1
    stream = bitplanes.reshape(-1)
    stream = jnp.pad(stream, (0, -stream.size % 8)).reshape(-1, 8)
    return (stream << jnp.arange(8, dtype=jnp.uint32)).sum(axis=1).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as ``int32``.

    Examples:
      >>> import jax.numpy as jnp
      >>> unpack_bits(pack_bits(jnp.arange(8), 3), 3, 8).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7]
    """
    _check_bits(bits)
    stream = ((packed[:, None].astype(jnp.uint32) >> jnp.arange(8, dtype=jnp.uint32)) & 1).reshape(-1)
    planes = stream[: n * bits].reshape(n, bits)
    return (planes << jnp.arange(bits, dtype=jnp.uint32)).sum(axis=1).astype(jnp.int32)
