"""Binary, ternary and float8 formats: values, packed bytes, STE, errors, ternary digits CNN."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import digits_util as du
import jaxopt_big as jb
from jaxopt_big.quant._fake import fake_quant
from jaxopt_big.quant._formats import Binary, F8, Float8, SubByteArray, Ternary
from jaxopt_big.quant._ptq import fake_quant_params, quantize_params


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(rows=st.integers(3, 40), cols=st.integers(1, 9), seed=st.integers(0, 1000))
def test_ternary_matches_twn_reference_with_three_values_per_channel(rows, cols, seed):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    got = np.asarray(jax.jit(Ternary().fake_quant)(jnp.asarray(w)))  # jitted: one compile per drawn shape
    delta = 0.7 * np.abs(w).mean(0)
    keep = np.abs(w) > delta
    alpha = (np.abs(w) * keep).sum(0) / keep.sum(0)
    np.testing.assert_allclose(got, np.sign(w) * keep * alpha, rtol=1e-6)
    for c in range(cols):
        levels = np.array([-alpha[c], 0.0, alpha[c]])
        assert np.abs(got[:, c, None] - levels).min(1).max() <= 1e-6 * alpha[c]
        assert len(np.unique(got[:, c])) <= 3
    np.testing.assert_allclose(np.asarray(jax.jit(lambda w: Ternary().quantize(w).dense())(jnp.asarray(w))), got,
                               rtol=1e-6)


def test_ternary_takes_exactly_three_values_per_channel_on_a_real_kernel():
    w = du.dense_cnn()[2]["Dense_0"]["kernel"]
    t = np.asarray(Ternary().quantize(w).dense())
    assert all(len(np.unique(t[:, c])) == 3 for c in range(t.shape[1]))


def test_binary_is_sign_times_channel_mean_magnitude():
    w = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    want = np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean(0)
    np.testing.assert_allclose(np.asarray(Binary().fake_quant(jnp.asarray(w))), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(Binary().quantize(jnp.asarray(w)).dense()), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(Binary(axis=None).fake_quant(jnp.asarray(w))),
                               np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean(), rtol=1e-6)


@pytest.mark.parametrize("fmt,bits", [(Binary(), 1), (Ternary(), 2)])
def test_packed_bytes_within_two_percent_of_the_bit_limit_plus_scales(fmt, bits):
    params = du.dense_cnn()[2]
    packed = quantize_params(params, fmt)
    for name, layer in params.items():
        leaf = packed[name]["kernel"]
        assert isinstance(leaf, SubByteArray) and leaf.bits == bits
        limit = leaf.size * bits / 8 + layer["kernel"].shape[-1] * 4
        assert limit <= leaf.nbytes <= 1.02 * limit, (name, leaf.nbytes, limit)
    kernels = sum(v["kernel"].size for v in params.values())
    total = sum(packed[k]["kernel"].nbytes for k in params)
    print(f"{type(fmt).__name__}: {total} bytes for {kernels} weights ({8 * total / kernels:.3f} bits/weight)")


def test_sub_byte_formats_train_straight_through():
    w = jnp.array([[0.1, -2.0], [1.5, 0.3]])
    for fmt in (Binary(), Ternary(), Float8("e5m2")):
        grad = jax.grad(lambda w: (fake_quant(w, fmt) * jnp.arange(4.0).reshape(2, 2)).sum())(w)
        np.testing.assert_array_equal(grad, jnp.arange(4.0).reshape(2, 2))


@pytest.mark.parametrize("name,dtype", [("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)])
def test_float8_is_a_scaled_ml_dtypes_cast(name, dtype):
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32) * 3
    fmt = Float8(name)
    assert fmt.format is F8(name)
    scale = np.abs(x).max() / float(ml_dtypes.finfo(dtype).max)
    want = (x / scale).astype(dtype).astype(np.float32) * scale
    np.testing.assert_allclose(np.asarray(fmt.fake_quant(jnp.asarray(x))), want, rtol=1e-6)
    q = fmt.quantize(jnp.asarray(x))
    assert q.values.dtype == dtype and q.nbytes == x.size + 4
    np.testing.assert_allclose(np.asarray(q.dense()), want, rtol=1e-6)


def test_bad_format_options_fail_with_the_value():
    with pytest.raises(ValueError, match="'e3m4'"):
        Float8("e3m4")
    with pytest.raises(ValueError, match="-1"):
        Ternary(threshold=-1)
    with pytest.raises(ValueError, match=r"layer/kernel: Float8 uses one per-tensor scale"):
        Float8().fake_quant(jnp.ones((2, 2)), jnp.ones(2), path="layer/kernel")
    with pytest.raises(ValueError, match=r"k/kernel: axis=3"):
        quantize_params({"k": {"kernel": jnp.ones((2, 2))}}, Binary(axis=3))


def test_ternary_digits_cnn_trained_by_ste_within_two_points_of_float():
    _, apply, params, dense_acc = du.dense_cnn()
    train, test = du.split()
    tern_apply = lambda p, x: apply(fake_quant_params(p, Ternary()), x)
    trained = du.fit(tern_apply, params, train, epochs=3, lr=1e-3)
    acc = du.accuracy(tern_apply, trained, test)
    stored = quantize_params(trained, Ternary())
    assert du.accuracy(apply, jb.leaves.densify(stored), test) == acc
    print(f"digits CNN: float {dense_acc:.4f}, ternary (STE, 3 epochs from float) {acc:.4f}, "
          f"{jb.leaves.nbytes(stored)} vs {jb.leaves.nbytes(params)} bytes")
    assert acc >= dense_acc - 0.02
