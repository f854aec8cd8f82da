"""The one bit packer against numpy's little-endian bit stream."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_big import _bits


def _reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Column by column: every code's ``bits`` low bits, lowest first, as numpy's little-endian stream."""
    cols = codes.reshape(codes.shape[0], -1)
    planes = (cols[:, None, :].astype(np.int64) >> np.arange(bits)[None, :, None]) & 1
    stream = planes.reshape(-1, cols.shape[1]).astype(np.uint8)
    packed = np.packbits(stream, axis=0, bitorder="little")
    return packed.reshape(packed.shape[0], *codes.shape[1:])


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(bits=st.integers(1, 16), n=st.integers(1, 40), cols=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_pack_equals_the_numpy_bit_stream_and_round_trips(bits, n, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (n, cols))
    packed = _bits.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(n * bits / 8), cols)
    np.testing.assert_array_equal(np.asarray(packed), _reference(codes, bits))
    np.testing.assert_array_equal(np.asarray(_bits.unpack(packed, bits, n)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_codes_round_trip(bits):
    q = np.random.default_rng(bits).integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (9, 4))
    back = _bits.unpack(_bits.pack(jnp.asarray(q, jnp.float32), bits), bits, 9, signed=True)
    assert back.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(back), q)


def test_packing_along_axis_0_keeps_a_column_sharding():
    mesh = jax.make_mesh((8,), ("x",))
    codes = jax.device_put(jnp.ones((16, 8), jnp.int32), jax.sharding.NamedSharding(mesh, jax.P(None, "x")))
    assert jax.jit(lambda c: _bits.pack(c, 4))(codes).sharding.spec == jax.P(None, "x")


def test_bad_widths_raise():
    with pytest.raises(ValueError, match=r"width must be an int in \[1, 16\], got 17"):
        _bits.pack(jnp.zeros(3), 17)
    with pytest.raises(ValueError, match="signed codes are at most 8 bits"):
        _bits.unpack(jnp.zeros((4,), jnp.uint8), 12, 2, signed=True)
