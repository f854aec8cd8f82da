"""Binary, ternary and float8 formats: values, packed bytes, STE, errors, ternary digits CNN."""

import contextlib
import math

import digits_util as du
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxopt_big as jb
from jaxopt_big import quant as q
from jaxopt_big.quant import F8, Binary, Float8, SubByteArray, Ternary, fake_quant, fake_quant_params, quantize_params


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


def test_ternary_digits_cnn_trained_by_ste_within_two_points_of_float(digits):
    _, apply, params, dense_acc = du.dense_cnn()
    train, test = digits
    tern_apply = lambda p, x: apply(fake_quant_params(p, Ternary()), x)
    trained = du.fit(tern_apply, params, train, epochs=3, lr=1e-3)
    acc = du.accuracy(tern_apply, trained, test)
    stored = quantize_params(trained, Ternary())
    assert du.accuracy(apply, jb.leaves.densify(stored), test) == acc
    print(f"digits CNN: float {dense_acc:.4f}, ternary (STE, 3 epochs from float) {acc:.4f}, "
          f"{jb.leaves.nbytes(stored)} vs {jb.leaves.nbytes(params)} bytes")
    assert acc >= dense_acc - 0.02


@pytest.mark.parametrize("with_mesh,size", [(False, 2), (False, 8), (True, 4)])
def test_group_quantization_along_a_sharded_axis_equals_unsharded(explicit_mesh, with_mesh, size):
    w = jax.random.normal(jax.random.key(2), (8, 16))
    params = {"d": {"kernel": jax.device_put(w, jax.NamedSharding(explicit_mesh, jax.P("data", "model")))}}
    spec = q.QuantSpec(bits=4, granularity=q.Group(size))
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        got = q.quantize_params(params, spec)["d"]["kernel"]
        fake = q.fake_quant_params(params, spec)["d"]["kernel"]
    want = q.quantize(w, spec)
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(got.dense(), want.dense())
    np.testing.assert_array_equal(fake, want.dense())


BAD = [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)]


@pytest.mark.parametrize("name,bad", BAD)
@pytest.mark.parametrize("fmt", [q.QuantSpec(bits=4, granularity=q.PER_CHANNEL),
                                 q.QuantSpec(bits=4, granularity=q.PER_CHANNEL, narrow=False),
                                 q.QuantSpec(bits=4, symmetric=False, granularity=q.PER_CHANNEL),
                                 q.QuantSpec(bits=4, symmetric=False, granularity=q.PER_CHANNEL, calibration=q.MSE(steps=4)),
                                 q.QuantSpec(bits=4, granularity=q.PER_CHANNEL, calibration=q.Percentile(99.0)),
                                 q.QuantSpec(bits=4, granularity=q.Group(4)), q.Binary(), q.Ternary()], ids=repr)
def test_traced_non_finite_weight_poisons_only_its_own_channel(name, bad, fmt):
    w = jax.random.normal(jax.random.key(0), (8, 4))
    poisoned = w.at[2, 1].set(bad)
    fake = jax.jit(fmt.fake_quant)(poisoned)
    dense = jax.jit(lambda x: fmt.quantize(x).dense())(poisoned)
    group = np.zeros((8, 4), bool)
    group[(slice(0, 4) if isinstance(getattr(fmt, "granularity", None), q.Group) else slice(None)), 1] = True
    for out in (fake, dense):
        assert np.isnan(np.asarray(out)[group]).all()            # the poisoned group is NaN, visibly
        np.testing.assert_allclose(np.asarray(out)[~group], np.asarray(fmt.fake_quant(w))[~group], rtol=1e-6)


def test_float8_fake_quant_has_no_gradient_outside_a_fixed_range():
    x = jnp.array([0.5, -1.0, 3.0, -7.5, 100.0])
    scale = 4.0 / q.Float8().max                                               # range [-4, 4]
    out = q.Float8().fake_quant(x, scale)
    np.testing.assert_allclose(out[2:], [3.0, -4.0, 4.0], rtol=0.07)
    grad = jax.grad(lambda x: q.Float8().fake_quant(x, scale).sum())(x)
    np.testing.assert_array_equal(grad, [1.0, 1.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("with_mesh", [False, True])
@pytest.mark.parametrize("fmt", [q.Binary(), q.Ternary(), q.Binary(axis=None)], ids=str)
def test_binary_and_ternary_on_explicit_sharding_equal_unsharded(explicit_mesh, with_mesh, fmt):
    w = jax.random.normal(jax.random.key(6), (8, 16))
    sharded = jax.device_put(w, jax.NamedSharding(explicit_mesh, jax.P("data", "model")))
    want = fmt.quantize(w)
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        got = q.quantize_params({"d": {"kernel": sharded}}, fmt)["d"]["kernel"]
        dense = got.dense()
        jitted = jax.jit(lambda w: q.quantize(w, fmt).dense())(sharded)
        fake = q.fake_quant(sharded, fmt)
    np.testing.assert_array_equal(got.codes, want.codes)
    # the scale is a mean over the sharded rows: summed shard by shard, so equal up to rounding
    np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)
    for x in (dense, jitted, fake):
        np.testing.assert_allclose(x, want.dense(), rtol=1e-6)
