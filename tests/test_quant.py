"""Quantization core: grids, calibration, fake-quant STE, packed QArray, PTQ trees, integer execution."""

import contextlib
import re

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big.tree import Rule
from jaxopt_big.quant import (MSE, PER_CHANNEL, PER_TENSOR, PER_TOKEN, AbsMax, Group, MinMax, Percentile, QArray,
                              QuantSpec)

GRANULARITIES = [PER_TENSOR, PER_CHANNEL, Group(2), Group(4)]


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(bits=st.integers(2, 8), symmetric=st.booleans(), g=st.sampled_from(GRANULARITIES),
                  calibration=st.sampled_from([AbsMax(), MinMax()]), seed=st.integers(0, 1000),
                  scale=st.floats(1e-3, 1e3), narrow=st.sampled_from([None, False]))
def test_round_trip_error_at_most_half_a_step(bits, symmetric, g, calibration, seed, scale, narrow):
    x = scale * jax.random.normal(jax.random.key(seed), (8, 6))
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=g, calibration=calibration,
                     narrow=narrow if symmetric else None)
    q = jb.quant.quantize(x, spec)
    step = jb.quant.expand(q.scale, x.shape)
    err = jnp.abs(jb.quant.dequantize(q) - x)
    # absmax/min-max: every value is inside the range. An affine absmax grid puts the largest value
    # exactly half a step from the grid (the zero point is rounded), so float32 rounding of |x| counts too.
    slack = 4 * np.finfo(np.float32).eps * jnp.abs(x)
    assert bool(jnp.all(err <= step / 2 * (1 + 1e-5) + slack))
    ints = q.int_values()
    assert int(ints.min()) >= spec.qmin and int(ints.max()) <= spec.qmax
    np.testing.assert_allclose(jb.quant.dequantize(q), jb.quant.fake_quant(x, spec), rtol=1e-6, atol=1e-6 * scale)


def test_int8_symmetric_per_channel_absmax_matches_numpy():
    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    q = jb.quant.quantize(x, QuantSpec(bits=8, granularity=PER_CHANNEL))
    scale = np.abs(x).max(axis=0, keepdims=True) / 127
    ref = np.clip(np.round(x / scale), -127, 127).astype(np.int8)
    np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(q.values, ref)
    assert q.values.dtype == jnp.int8


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("symmetric,narrow,calibration", [(False, None, AbsMax()), (False, None, MinMax()),
                                                          (True, None, AbsMax()), (True, None, MinMax()),
                                                          (True, False, AbsMax()), (True, False, MinMax())],
                         ids=["affine-absmax", "affine-minmax", "narrow-absmax", "narrow-minmax", "full-absmax",
                              "full-minmax"])
def test_absmax_and_minmax_grids_match_numpy(bits, symmetric, narrow, calibration):
    """Affine: AbsMax spans ``[-absmax, absmax]``, MinMax ``[min(x, 0), max(x, 0)]`` on all 2^b codes.
    Symmetric (both): the smallest scale whose codes hold the minimum and the maximum."""
    rng = np.random.default_rng(0)  # all-positive, all-negative and mixed channels, either end the larger
    x = rng.normal(size=(32, 6)) * [1.0, 1.0, 1.0, 1.0, 0.5, 2.0] + [3.0, -3.0, -0.5, 0.5, 0.0, 1.0]
    x = x.astype(np.float32)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=PER_CHANNEL, calibration=calibration, narrow=narrow)
    scale, zero_point = (None if v is None else np.asarray(v, np.float64).ravel() for v in jb.quant.calibrate(x, spec))
    lo, hi = np.minimum(x.min(axis=0), 0).astype(np.float64), np.maximum(x.max(axis=0), 0).astype(np.float64)
    half = 2 ** (bits - 1)
    if symmetric:
        qmin = -half if narrow is False else -(half - 1)
        np.testing.assert_allclose(scale, np.maximum(lo / qmin, hi / (half - 1)), rtol=1e-6)
        assert zero_point is None
    else:
        if isinstance(calibration, AbsMax):
            lo, hi = -np.maximum(-lo, hi), np.maximum(-lo, hi)
        np.testing.assert_allclose(scale, (hi - lo) / (2 ** bits - 1), rtol=1e-6)
        # an integer zero point (rounded, so up to half a code) that puts lo at the lowest code
        assert np.all(zero_point == np.round(zero_point))
        assert np.abs(zero_point - (-half - lo / scale)).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("calibration", [AbsMax(), MinMax(), Percentile(99.0), MSE(steps=8)])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_zero_and_constant_tensors_give_finite_scales(symmetric, calibration, value):
    x = jnp.full((4, 3), value)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=PER_CHANNEL, calibration=calibration)
    scale, zp = jb.quant.calibrate(x, spec)
    assert bool(jnp.all(jnp.isfinite(scale)) and jnp.all(scale > 0))
    # symmetric grids hit a constant exactly (it is the absmax); affine ones within one step (zero-point rounding)
    tol = 1e-6 if symmetric else float(scale.max()) + 1e-6
    np.testing.assert_allclose(jb.quant.dequantize(jb.quant.quantize(x, spec)), x, atol=tol)


def test_ste_gradient_is_one_inside_and_zero_outside():
    x = jnp.array([-5.0, -1.4, -0.2, 0.0, 0.7, 1.5, 9.0])
    spec = QuantSpec(bits=2)  # grid {-1, 0, 1} * scale; range [-1.5, 1.5] at scale 1.5
    g = jax.grad(lambda x: jb.quant.fake_quant(x, spec, scale=1.5).sum())(x)
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 1, 0])
    # Self-calibrated (absmax): everything is inside, gradient is exactly the identity.
    g = jax.grad(lambda x: (jb.quant.fake_quant(x, QuantSpec(bits=4)) * x).sum())(x)
    np.testing.assert_allclose(g, jb.quant.fake_quant(x, QuantSpec(bits=4)) + x, rtol=1e-6)


def test_packing_bytes_and_containers():
    w = jax.random.normal(jax.random.key(0), (1024, 1024))
    dense = w.nbytes
    q8 = jb.quant.quantize(w, QuantSpec(bits=8, granularity=PER_CHANNEL))
    q4 = jb.quant.quantize(w, QuantSpec(bits=4, granularity=PER_CHANNEL))
    q2 = jb.quant.quantize(w, QuantSpec(bits=2, granularity=PER_CHANNEL))
    q3 = jb.quant.quantize(w, QuantSpec(bits=3, granularity=PER_CHANNEL))
    assert dense / q8.nbytes >= 3.9 and dense / q4.nbytes >= 7.5 and dense / q2.nbytes >= 15
    assert q4.values.shape == (512, 1024) and q2.values.shape == (256, 1024) and q3.values.shape == (384, 1024)
    assert q3.kind == "int3" and jb.leaves.nbytes({"k": q4}) == q4.nbytes
    # odd leading axis: padding is dropped on unpack
    x = jax.random.normal(jax.random.key(1), (7, 3))
    for bits in (2, 3, 4):
        spec = QuantSpec(bits=bits)
        np.testing.assert_allclose(jb.quant.dequantize(jb.quant.quantize(x, spec)), jb.quant.fake_quant(x, spec))


def test_qarray_is_a_pytree_leaf_in_jit():
    w = jax.random.normal(jax.random.key(0), (8, 4))
    q = jb.quant.quantize(w, QuantSpec(bits=4, granularity=PER_CHANNEL))
    assert jb.leaves.is_compressed(q)
    out = jax.jit(lambda q: q.dense())(q)
    np.testing.assert_allclose(out, q.dense())
    assert jb.tree.paths({"k": q}) == ["k"]


def test_mse_beats_absmax_for_heavy_tails():
    x = jax.random.t(jax.random.key(0), 2.0, (256, 8))
    err = {c: float(jnp.square(jb.quant.fake_quant(x, QuantSpec(bits=3, granularity=PER_CHANNEL,
                                                                 calibration=c)) - x).mean())
           for c in (AbsMax(), Percentile(99.0), MSE())}
    assert err[MSE()] < err[Percentile(99.0)] and err[MSE()] < err[AbsMax()]


def hand_mse(w, bits, full, steps=64, min_ratio=0.1):
    """Independent reference: per column, the clipping ratio of absmax with the least squared error on
    the narrow grid ``±(2^(b-1)-1)`` or the full grid ``[-2^(b-1), 2^(b-1)-1]`` (absmax at ``-2^(b-1)``)."""
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax - 1 if full else -qmax
    amax = np.abs(w).max(0)
    best = np.full(w.shape[1], np.inf)
    for r in np.linspace(min_ratio, 1.0, steps):
        s = r * amax / -qmin
        best = np.minimum(best, ((np.clip(np.round(w / s), qmin, qmax) * s - w) ** 2).sum(0))
    return best


def _channel_error(w, spec):
    return np.asarray(((jb.quant.fake_quant(w, spec) - w) ** 2).sum(0))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_range_grid_uses_all_codes_and_packs_them(bits):
    normal = np.random.default_rng(bits).normal(size=(257, 6)).astype(np.float32)  # odd length: packing pads
    even = np.linspace(-2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1, 257)[:, None] * np.arange(1, 7, dtype=np.float32)
    for spec, w in ((QuantSpec(bits=bits, narrow=False, granularity=PER_CHANNEL), even.astype(np.float32)),
                    (QuantSpec(bits=bits, granularity=PER_CHANNEL, calibration=MSE()), normal)):  # the natural call
        assert spec.full_range and spec.qmin == -2 ** (bits - 1)
        q = jb.quant.quantize(w, spec)
        codes = np.asarray(q.int_values())
        assert set(codes.ravel().tolist()) == set(range(-2 ** (bits - 1), 2 ** (bits - 1)))
        assert q.values.shape[0] == -(-257 * jb.quant.container_bits(bits) // 8)
        step = np.asarray(jb.quant.expand(q.scale, w.shape))
        np.testing.assert_array_equal(codes, np.clip(np.round(w / step), spec.qmin, spec.qmax))
        np.testing.assert_allclose(q.dense(), jb.quant.fake_quant(w, spec), rtol=1e-6)
    # absmax on the full grid: the largest magnitude sits on whichever end holds it, nothing clips
    scale, _ = jb.quant.calibrate(np.array([[-2.0, 3.0], [1.0, -1.0]]), QuantSpec(bits=2, narrow=False,
                                                                                  granularity=PER_CHANNEL))
    np.testing.assert_allclose(scale, [[1.0, 3.0]])
    assert QuantSpec(bits=bits).qmin == -(2 ** (bits - 1) - 1)  # absmax stays narrow by default


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_natural_mse_call_no_worse_than_either_hand_search(bits):
    w = np.random.default_rng(10 + bits).standard_t(4, size=(128, 48)).astype(np.float32)
    w[:, :16] = -np.abs(w[:, :16])  # one-sided channels, where the extra code matters most
    ours = _channel_error(w, QuantSpec(bits=bits, granularity=PER_CHANNEL, calibration=MSE()))
    narrow, full = hand_mse(w, bits, False), hand_mse(w, bits, True)
    assert np.all(ours <= np.minimum(narrow, full) * (1 + 1e-5))
    assert ours[:16].sum() < 0.9 * narrow[:16].sum()  # the extra code pays on one-sided channels
    # narrow=True keeps the narrow search exactly
    np.testing.assert_allclose(_channel_error(w, QuantSpec(bits=bits, granularity=PER_CHANNEL, calibration=MSE(),
                                                           narrow=True)), narrow, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
def test_group_mse_no_worse_than_either_hand_search_per_group(bits):
    """Each group of 32 inputs of each output column has its own search: compare it group by group."""
    w = np.random.default_rng(bits).laplace(size=(128, 24)).astype(np.float32)
    w[:32] *= 10.0  # one group far wider than the others: its scale must not leak into them
    spec = QuantSpec(bits=bits, granularity=Group(32), calibration=MSE())
    ours = ((np.asarray(jb.quant.fake_quant(w, spec)) - w) ** 2).reshape(4, 32, 24).sum(1).ravel()
    blocks = w.reshape(4, 32, 24).transpose(1, 0, 2).reshape(32, -1)  # column j*24+k: group j of output k
    for full in (False, True):
        assert np.all(ours <= hand_mse(blocks, bits, full) * (1 + 1e-5))


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_affine_mse_no_worse_than_symmetric(bits):
    w = np.random.default_rng(bits).normal(size=(96, 32)).astype(np.float32)
    w[:, 0] = np.linspace(-1.0, 1.0, 96)  # a symmetric channel, where zero point 0 is best
    sym = _channel_error(w, QuantSpec(bits=bits, granularity=PER_CHANNEL, calibration=MSE()))
    aff = _channel_error(w, QuantSpec(bits=bits, symmetric=False, granularity=PER_CHANNEL, calibration=MSE()))
    assert np.all(aff <= sym * (1 + 1e-5))


def test_scales_keep_parameter_sharding_on_8_devices():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    sharding = jax.NamedSharding(mesh, jax.P("data", "model"))
    w = jax.device_put(jax.random.normal(jax.random.key(0), (64, 32)), sharding)
    params = {"Dense_0": {"kernel": w}}
    for spec in (QuantSpec(bits=8, granularity=PER_CHANNEL), QuantSpec(bits=4, granularity=Group(16))):
        q = jb.quant.quantize_params(params, spec)["Dense_0"]["kernel"]
        assert q.scale.sharding.spec == jax.P(None, "model") or isinstance(spec.granularity, Group)
        if isinstance(spec.granularity, Group):
            assert q.scale.shape == (4, 32) and q.scale.sharding.spec == jax.P("data", "model")
        assert q.values.sharding.spec == jax.P("data", "model")
        np.testing.assert_allclose(q.dense(), jb.quant.fake_quant(np.asarray(w), spec), rtol=1e-6)
    q = jax.jit(lambda w: jb.quant.quantize(w, QuantSpec(granularity=PER_CHANNEL)))(w)
    assert q.scale.sharding.spec[-1] == "model"


def test_params_rules_first_match_wins_and_errors():
    p = {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
    q = jb.quant.quantize_params(p, [Rule("Dense_0/.*", QuantSpec(bits=4)), Rule(".*", QuantSpec(bits=8))])
    assert q["Dense_0"]["kernel"].bits == 4 and q["Dense_1"]["kernel"].bits == 8
    assert not isinstance(q["Dense_0"]["bias"], QArray)
    q = jb.quant.quantize_params(p, [Rule("Dense_0/.*", None), Rule(".*", QuantSpec(bits=8))])
    assert not isinstance(q["Dense_0"]["kernel"], QArray) and isinstance(q["Dense_1"]["kernel"], QArray)
    np.testing.assert_allclose(jb.leaves.densify(q)["Dense_1"]["kernel"], 1.0)
    with pytest.raises(ValueError, match="Dense_9"):
        jb.quant.quantize_params(p, [Rule("Dense_9/.*", QuantSpec())])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="narrow=True needs a symmetric grid"):
        QuantSpec(bits=4, symmetric=False, narrow=True)
    with pytest.raises(TypeError, match="narrow \\(or None\\) must be a bool, got .yes."):
        QuantSpec(narrow="yes")
    with pytest.raises(ValueError, match="bits.*9"):
        QuantSpec(bits=9)
    with pytest.raises(ValueError, match="bits.*1"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="0, 100.*101"):
        Percentile(101)
    with pytest.raises(ValueError, match="0, 100.*0"):
        Percentile(0)
    with pytest.raises(TypeError, match="granularity"):
        QuantSpec(granularity="per_channel")
    p = {"Dense_0": {"kernel": jnp.ones((6, 4))}}   # a group that does not divide 6 inputs: a shorter last one
    assert jb.quant.quantize_params(p, QuantSpec(granularity=Group(4)))["Dense_0"]["kernel"].scale.shape == (2, 4)
    p = {"Dense_0": {"kernel": jnp.ones((6, 4)).at[1, 1].set(jnp.nan)}}
    with pytest.raises(ValueError, match=r"Dense_0/kernel: values to quantize contain NaN or Inf \(1 of 24"):
        jb.quant.quantize_params(p, QuantSpec())
    with pytest.raises(TypeError, match="Dense_0/kernel: quantization needs a floating array"):
        jb.quant.quantize_params({"Dense_0": {"kernel": jnp.ones((2, 2), jnp.int32)}}, QuantSpec(), where=".*")


# ---------------------------------------------------------------- integer execution


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.DenseGeneral(10)(x)


W8 = QuantSpec(bits=8, granularity=PER_CHANNEL)
A8 = QuantSpec(bits=8)


def _fake_reference(variables, x, weights, activations):
    """Independent reference: fake-quant every layer input and kernel by hand, float everything."""
    def impl(call):
        params = {**call.params, "kernel": jb.quant.fake_quant(call.kernel, weights)}
        xin = call.inputs if activations is None else jb.quant.fake_quant(call.inputs, activations)
        return call.run(params, xin)
    # jitted: eagerly, every op of the reference would compile on its own
    return jax.jit(jb.intercept.replace(_Net().apply, None, impl))(variables, x)


@pytest.mark.parametrize("activations", [A8, QuantSpec(bits=8, granularity=PER_TOKEN), None])
def test_int8_matmul_matches_fake_quant(activations):
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    v = _Net().init(jax.random.key(1), x)
    ours = jax.jit(jb.quant.qat(_Net().apply, weights=W8, activations=activations))(v, x)
    ref = _fake_reference(v, x, W8, activations)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    # the integer path really runs int8 x int8 -> int32
    hlo = jax.jit(jb.quant.qat(_Net().apply, weights=W8, activations=A8)).lower(v, x).as_text()
    assert re.search(r"dot_general .*\(tensor<4x288xi8>, tensor<288x32xi8>\) -> tensor<4x32xi32>", hlo), hlo


def test_qat_gradients_are_straight_through():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    v = model.init(jax.random.key(1), x)
    scale = jnp.abs(x).max() / 127 / 2  # static scale clips the largest half of the inputs
    s = {"": jb.quant.Scale(scale, None)}
    loss = lambda v, x: jnp.sum(jb.quant.qat(model.apply, weights=W8, activations=A8, scales=s)(v, x) ** 2)
    gv, gx = jax.grad(loss, argnums=(0, 1))(v, x)
    # analytic STE reference: d/dW = x_hat^T dy, d/dx = (dy W_hat^T) * inside
    w_hat = jb.quant.fake_quant(v["params"]["kernel"], W8)
    x_hat = jb.quant.fake_quant(x, A8, scale=scale)
    dy = 2 * (x_hat @ w_hat + v["params"]["bias"])
    inside = jnp.abs(x) <= 127 * scale
    np.testing.assert_allclose(gv["params"]["kernel"], x_hat.T @ dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gv["params"]["bias"], dy.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, (dy @ w_hat.T) * inside, rtol=1e-5, atol=1e-5)
    assert 0 < int(inside.sum()) < x.size


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_apply_with_qarray_kernels(bits):
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    v = _Net().init(jax.random.key(1), x)
    spec = QuantSpec(bits=bits, granularity=PER_CHANNEL)
    qv = {"params": jb.quant.quantize_params(v["params"], spec)}
    ref = jax.jit(_Net().apply)(jb.leaves.densify(qv), x)
    weight_only = jax.jit(jb.quant.qat(_Net().apply))(qv, x)
    np.testing.assert_allclose(weight_only, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    full = jax.jit(jb.quant.qat(_Net().apply, activations=A8))(qv, x)
    np.testing.assert_allclose(full, _fake_reference(v, x, spec, A8), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_static_activation_scales_ptq():
    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 3))
    v = _Net().init(jax.random.key(1), x)
    scales = jb.quant.calibrate_activations(_Net().apply, [(v, x[:8]), (v, x[8:])], A8)
    assert sorted(scales) == ["Conv_0", "DenseGeneral_0", "Dense_0"]
    np.testing.assert_allclose(scales["Conv_0"].scale.squeeze(), jnp.abs(x).max() / 127, rtol=1e-6)
    f = jax.jit(jb.quant.qat(_Net().apply, weights=W8, activations=A8, scales=scales))
    ours = f(v, x[:2])
    def impl(call):  # reference with the same static scales
        s = scales[call.path]
        params = {**call.params, "kernel": jb.quant.fake_quant(call.kernel, W8)}
        return call.run(params, jb.quant.fake_quant(call.inputs, A8, scale=s.scale))
    ref = jax.jit(jb.intercept.replace(_Net().apply, None, impl))(v, x[:2])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    with pytest.raises(ValueError, match="PER_TOKEN"):
        jb.quant.calibrate_activations(_Net().apply, [(v, x)], QuantSpec(granularity=PER_TOKEN))


def test_nnx_linear_and_conv():
    model = jb.models.NnxCNN(features=(4, 8), hidden=16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    ours = nnx.jit(lambda m, x: jb.quant.qat(m, weights=W8, activations=A8)(x))(model, x)
    def impl(call):
        params = {**call.params, "kernel": jb.quant.fake_quant(call.kernel, W8)}
        return call.run(params, jb.quant.fake_quant(call.inputs, A8))
    ref = nnx.jit(lambda m, x: jb.intercept.replace(m, None, impl)(x))(model, x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    assert not np.allclose(ours, nnx.jit(lambda m, x: m(x))(model, x), atol=1e-6)  # it did quantize


def test_weight_rules_must_match_a_layer():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    v = _Net().init(jax.random.key(1), x)
    f = jb.quant.qat(_Net().apply, weights=[Rule("Conv_0", QuantSpec(bits=4)), Rule("Nope_.*", W8)])
    with pytest.raises(ValueError, match="Nope"):
        f(v, x)


def test_calibration_of_a_closed_over_constant_inside_jit():
    x = jnp.linspace(-1.0, 1.0, 16)  # concrete, but traced into the jitted function below
    scale, _ = jax.jit(lambda: jb.quant.calibrate(x, jb.quant.QuantSpec(bits=8)))()
    np.testing.assert_allclose(float(np.asarray(scale).squeeze()), 1.0 / 127, rtol=1e-6)


@pytest.mark.parametrize("gradient", list(jb.quant.Gradient))
def test_qat_gradient_modes_differentiate_at_the_stated_operands(gradient):
    model = nn.Dense(16, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (4, 32))
    w = model.init(jax.random.key(1), x)["params"]["kernel"]
    g = np.asarray(jax.random.normal(jax.random.key(2), (4, 16)))
    f = jb.quant.qat(model.apply, weights=QuantSpec(granularity=PER_CHANNEL), activations=QuantSpec(),
                     gradient=gradient)
    gx = jax.grad(lambda x: (f({"params": {"kernel": w}}, x) * g).sum())(x)
    gw = jax.grad(lambda w: (f({"params": {"kernel": w}}, x) * g).sum())(w)
    wn, xn = np.asarray(w, np.float64), np.asarray(x, np.float64)
    sw = np.abs(wn).max(0, keepdims=True) / 127  # independent numpy fake-quant of both operands
    sx = np.abs(xn).max() / 127
    wq, xq = np.round(wn / sw) * sw, np.round(xn / sx) * sx
    w_at, x_at = (wq, xq) if gradient is jb.quant.Gradient.QUANTIZED else (wn, xn)
    np.testing.assert_allclose(gx, g @ w_at.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, x_at.T @ g, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="gradient must be"):
        jb.quant.qat(model.apply, gradient="float")


# ---------------------------------------------------------------- regressions: STE ends, given grids, edge inputs


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity=PER_CHANNEL),
                                  QuantSpec(bits=8, symmetric=False, granularity=PER_CHANNEL, calibration=MinMax()),
                                  QuantSpec(bits=4, symmetric=False, granularity=Group(4), calibration=AbsMax())])
def test_every_value_of_a_self_calibrated_range_keeps_its_gradient(spec):
    # absmax / 127 * 127 falls one float32 ulp short of 0.24812406; affine grids round their zero point.
    w = jax.random.uniform(jax.random.key(0), (16, 64), minval=-0.2, maxval=0.2).at[0].set(0.24812406)
    ones = np.ones(w.shape)
    np.testing.assert_array_equal(jax.grad(lambda w: jb.quant.fake_quant(w, spec).sum())(w), ones)
    grads = jax.grad(lambda p: jb.quant.fake_quant_params(p, spec)["d"]["kernel"].sum())({"d": {"kernel": w}})
    np.testing.assert_array_equal(grads["d"]["kernel"], ones)
    x = jnp.array([0.24812406, 0.1, -0.2])
    np.testing.assert_array_equal(jax.grad(lambda x: jb.quant.fake_quant(x, QuantSpec()).sum())(x), [1, 1, 1])


@pytest.mark.parametrize("spec", [QuantSpec(granularity=PER_CHANNEL, calibration=jb.quant.MinMax()),
                                  QuantSpec(symmetric=False, granularity=PER_CHANNEL, calibration=jb.quant.MinMax()),
                                  QuantSpec(bits=4, granularity=PER_CHANNEL, calibration=jb.quant.MSE())])
def test_qat_and_fake_quant_params_give_the_same_kernel_gradient(spec):
    model = nn.Dense(32)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    v = model.init(jax.random.key(1), x)
    by_qat = jax.grad(lambda v: jnp.sum(jb.quant.qat(model.apply, weights=spec)(v, x) ** 2))(v)
    by_fake = jax.grad(lambda v: jnp.sum(model.apply(jb.quant.fake_quant_params(v, spec), x) ** 2))(v)
    np.testing.assert_allclose(by_qat["params"]["kernel"], by_fake["params"]["kernel"], rtol=1e-5, atol=1e-6)


def test_only_values_beyond_rounding_of_the_range_count_as_clipped():
    x = jnp.array([-1.6, -1.4, 1.4, 1.6])  # grid {-1, 0, 1} at scale 1: +-1.4 round onto it, +-1.6 are clipped
    g = jax.grad(lambda x: jb.quant.fake_quant(x, QuantSpec(bits=2), scale=1.0).sum())(x)
    np.testing.assert_array_equal(g, [0, 1, 1, 0])


@pytest.mark.parametrize("scale, zero_point, error, message", [
    (0.0, None, ValueError, "scale must be finite and > 0, got 0.0"),
    (-1.0, None, ValueError, "scale must be finite and > 0, got -1.0"),
    (float("nan"), None, ValueError, "scale must be finite and > 0, got nan"),
    (True, None, TypeError, "scale must be a real number or array, got True"),
    (np.array([[1.0, 0.0]]), None, ValueError, r"scale must be finite and > 0, got 0.0 \(1 of 2 values\)"),
    (1.0, float("inf"), ValueError, "zero_point must be finite, got inf"),
])
def test_a_given_scale_and_zero_point_are_checked(scale, zero_point, error, message):
    x = jnp.array([[0.3, -0.7]])
    spec = QuantSpec(bits=4, symmetric=zero_point is None)
    for run in (lambda: jb.quant.fake_quant(x, spec, scale, zero_point, path="d/kernel"),
                lambda: spec.quantize(x, scale, zero_point, path="d/kernel")):
        with pytest.raises(error, match=f"d/kernel: {message}"):
            run()
    # Traced scales cannot be inspected: they pass (a learned or computed scale under jit).
    assert jax.jit(lambda s: jb.quant.fake_quant(x, QuantSpec(bits=4), s))(jnp.float32(0.5)).shape == x.shape


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("calibration", [AbsMax(), MinMax(), Percentile(99.0), MSE(steps=8)])
def test_a_huge_finite_range_quantizes_to_finite_values(symmetric, calibration):
    x = jnp.array([[-3e38, 3e38], [1e38, -2e38]])
    spec = QuantSpec(symmetric=symmetric, calibration=calibration)
    for out in (jb.quant.quantize(x, spec).dense(), jb.quant.fake_quant(x, spec)):
        np.testing.assert_allclose(out, x, rtol=0.02)


@pytest.mark.parametrize("use_mesh", [False, True])
def test_percentile_calibration_of_explicitly_sharded_params_gives_the_unsharded_result(use_mesh):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    w = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    sharded = jax.device_put(w, jax.NamedSharding(mesh, jax.P("data", "model")))
    specs = [QuantSpec(calibration=Percentile(90.0)),
             QuantSpec(bits=4, granularity=PER_CHANNEL, calibration=Percentile(90.0)),
             QuantSpec(bits=4, symmetric=False, granularity=Group(4, along=0), calibration=Percentile(80.0))]
    with jax.set_mesh(mesh) if use_mesh else contextlib.nullcontext():
        for spec in specs:
            want = jb.quant.quantize(w, spec).dense()
            np.testing.assert_array_equal(jb.quant.quantize(sharded, spec).dense(), want)
            np.testing.assert_array_equal(jb.quant.fake_quant(sharded, spec), want)
            q = jb.quant.quantize_params({"d": {"kernel": sharded}}, spec)["d"]["kernel"]
            np.testing.assert_array_equal(q.dense(), want)
            assert q.values.sharding.spec == jax.P("data", "model")
        scale, _ = jb.quant.calibrate(sharded, specs[1])
    np.testing.assert_allclose(scale * 7, np.percentile(np.abs(w), 90.0, axis=0, keepdims=True), rtol=1e-6)
    assert scale.sharding.spec == jax.P(None, "model")


def test_trees_with_compressed_leaves_quantize_their_float_kernels_only():
    p = {"q": {"kernel": jnp.ones((4, 4))}, "f": {"kernel": jnp.full((4, 4), 0.5)}}
    mixed = jb.quant.quantize_params(p, [Rule("q", QuantSpec())])
    out = jb.quant.quantize_params(mixed, QuantSpec(bits=4))
    assert out["q"]["kernel"] is mixed["q"]["kernel"] and out["f"]["kernel"].bits == 4
    out = jb.quant.fake_quant_params(mixed, QuantSpec(bits=4))
    assert out["q"]["kernel"] is mixed["q"]["kernel"] and isinstance(out["f"]["kernel"], jax.Array)
    for fn in (jb.quant.quantize_params, jb.quant.fake_quant_params):
        with pytest.raises(ValueError, match="q/kernel is a compressed QArray"):
            fn(mixed, QuantSpec(bits=4), where=".*kernel")


def test_a_group_longer_than_its_axis_quantizes_as_one_group_and_presets_fit_narrow_models():
    w = jax.random.normal(jax.random.key(0), (48, 8))
    for calibration in (AbsMax(), MinMax(), MSE()):
        g = jb.quant.quantize(w, QuantSpec(bits=4, granularity=Group(128), calibration=calibration))
        c = jb.quant.quantize(w, QuantSpec(bits=4, granularity=PER_CHANNEL, calibration=calibration))
        np.testing.assert_array_equal(np.asarray(g.dense()), np.asarray(c.dense()))
    # the group-128 presets on a model with 48- and 24-input layers (an error before)
    model = jb.models.MLP(features=(24,))
    x = jax.random.normal(jax.random.key(1), (64, 48))
    params = model.init(jax.random.key(2), x)["params"]
    out, report = jb.oneshot.compress(model, params, [x], jb.recipe.preset("gptq-int4"), progress=False)
    assert [r.bits for r in report.rows] == [4, 4]
    assert out["Dense_0"]["kernel"].scale.shape[-2:] == (1, 24)


def test_affine_default_calibration_is_min_max():
    # An affine grid fits [min, max] by default (GPTQ's reference does the same); symmetric ones use absmax.
    x = np.random.default_rng(0).normal(0.5, 1.0, (16, 6)).astype(np.float32) + np.arange(6, dtype=np.float32)
    scale, zero = jb.quant.calibrate(x, QuantSpec(bits=4, symmetric=False, granularity=PER_CHANNEL))
    lo, hi = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
    ref_scale = (hi - lo) / 15
    np.testing.assert_allclose(np.asarray(scale)[0], ref_scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero)[0], np.clip(np.round(-8 - lo / ref_scale), -8, 7))
    sym, _ = jb.quant.calibrate(x, QuantSpec(bits=4, granularity=PER_CHANNEL))
    np.testing.assert_allclose(np.asarray(sym)[0], np.abs(x).max(0) / 7, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_that_does_not_divide_the_inputs_leaves_a_shorter_last_group(symmetric):
    # Group(128) on 176 inputs (an intermediate_size real checkpoints have): groups [0, 128) and [128, 176)
    rng = np.random.default_rng(0)
    x = (rng.normal(0.3, 1.0, (176, 6)) * np.where(np.arange(176) < 128, 1.0, 5.0)[:, None]).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=Group(128))
    parts = (x[:128], x[128:])
    if symmetric:
        ref_scale, ref_zero = np.stack([np.abs(p).max(0) / 7 for p in parts]), None
    else:
        lo, hi = (np.stack([f(p, 0) for p in parts]) for f in (lambda p, a: np.minimum(p.min(a), 0),
                                                              lambda p, a: np.maximum(p.max(a), 0)))
        ref_scale = (hi - lo) / 15
        ref_zero = np.clip(np.round(-8 - lo / ref_scale), -8, 7)
    q = jb.quant.quantize(x, spec)
    assert q.scale.shape == (2, 6) and q.group_size == 128
    np.testing.assert_allclose(q.scale, ref_scale, rtol=1e-6)
    if not symmetric:
        np.testing.assert_array_equal(q.zero_point, ref_zero)
    rows = np.repeat(np.arange(2), [128, 48])                           # scale row of each input
    zero = 0.0 if ref_zero is None else ref_zero[rows]
    dense = (np.asarray(q.int_values(), np.float64) - zero) * ref_scale[rows]
    np.testing.assert_allclose(q.dense(), dense, rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(dense - x) <= ref_scale[rows] / 2 * (1 + 1e-5) + 1e-6)    # half a step
    np.testing.assert_allclose(jb.quant.fake_quant(x, spec), dense, rtol=1e-6, atol=1e-6)
    assert q.nbytes == 176 * 6 // 2 + (1 if symmetric else 2) * 2 * 6 * 4     # int4 codes + the 2 true scale rows
    assert q.describe().bits == pytest.approx(8 * q.nbytes / x.size)
    a = rng.normal(size=(3, 176)).astype(np.float32)
    c = jb.leaves.Contraction(jax.lax.dot_general, ((((1,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
    np.testing.assert_allclose(jb.leaves.contract(q, jnp.asarray(a), c), a @ dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_decode_step_on_a_shorter_last_group_equals_the_dense_matmul(bits):
    # 512 inputs in groups of 384: two scale rows that are not 256 inputs each, which a decode-size
    # input (one row) would stream tile by tile as if they were
    rng = np.random.default_rng(1)
    w = rng.normal(size=(512, 16)).astype(np.float32) * np.where(np.arange(512) < 384, 1.0, 8.0)[:, None]
    q = jb.quant.quantize(w, QuantSpec(bits=bits, granularity=Group(384)))
    assert q.group_size == 384
    x = rng.normal(size=(1, 512)).astype(np.float32)
    c = jb.leaves.Contraction(jax.lax.dot_general, ((((1,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
    np.testing.assert_allclose(jb.leaves.contract(q, jnp.asarray(x), c), x @ np.asarray(q.dense()),
                               rtol=1e-4, atol=1e-3)


def test_group_scales_of_a_multi_axis_kernel_given_in_its_layout_are_read_off_their_shape():
    # an Einsum kernel (8, 2, 4) contracting (8, 2): scales of 4 groups of 4 inputs laid out as (4, 1, 4)
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 2, 4)).astype(np.float32)
    scale = np.abs(w.reshape(4, 2, 2, 4)).max((1, 2)) / 7                 # per 2 rows of axis 0 (4 inputs)
    spec = QuantSpec(bits=4, granularity=Group(4))
    given = spec.quantize(jnp.asarray(w), jnp.asarray(scale[:, None, :]), None)
    assert given.group_size is None
    np.testing.assert_allclose(given.dense(), np.clip(np.round(w / np.repeat(scale, 2, 0)[:, None, :]), -8, 7)
                               * np.repeat(scale, 2, 0)[:, None, :], rtol=1e-6, atol=1e-6)


def _bit_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: per column, each code's ``bits`` low bits lowest first, as numpy packs them."""
    planes = (codes[:, None, :].astype(np.int64) >> np.arange(bits)[None, :, None]) & 1
    return np.packbits(planes.reshape(-1, codes.shape[1]).astype(np.uint8), axis=0, bitorder="little")


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_widths_pack_at_their_own_width(bits):
    w = np.random.default_rng(bits).normal(size=(21, 3)).astype(np.float32)
    spec = QuantSpec(bits=bits, granularity=PER_CHANNEL)
    q = jb.quant.quantize(w, spec)
    codes = np.clip(np.round(w / np.asarray(q.scale)), spec.qmin, spec.qmax).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(q.int_values()), codes)
    np.testing.assert_array_equal(np.asarray(q.values), _bit_stream(codes, bits))
    assert q.nbytes == -(-21 * bits // 8) * 3 + 3 * 4 and q.kind == f"int{bits}"
    assert jb.quant.layer_bytes({"d": {"kernel": w}}, bits=(bits,), spec=spec) == {"d/kernel": {bits: q.nbytes}}


def test_int3_on_an_axis_where_three_bits_save_nothing_keeps_nibbles():
    w = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    q = jb.quant.quantize(w, QuantSpec(bits=3, granularity=PER_CHANNEL))
    codes = np.asarray(q.int_values()).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(q.values), _bit_stream(codes, 4))
    assert q.kind == "int3 in int4" and q.values.shape == (3, 2)


@pytest.mark.parametrize("bits, granularity, symmetric", [(3, PER_CHANNEL, False), (5, Group(256), True),
                                                          (2, PER_CHANNEL, True)])  # int3 Group(64): below
def test_a_decode_step_on_packed_odd_widths_streams_and_equals_the_dense_matmul(bits, granularity, symmetric):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(512, 8)).astype(np.float32)
    q = jb.quant.quantize(w, QuantSpec(bits=bits, granularity=granularity, symmetric=symmetric))
    assert q.values.shape == (512 * bits // 8, 8)
    x = rng.normal(size=(2, 512)).astype(np.float32)
    c = jb.leaves.Contraction(jax.lax.dot_general, ((((1,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
    from jaxopt_big.quant import _matmul
    streamed = _matmul.streamed_matmul(c, jnp.asarray(x), q.values, bits, q.scale, q.zero_point)
    assert streamed is not None                                                   # the tiled path, not a fallback
    np.testing.assert_allclose(streamed, x @ np.asarray(q.dense()), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jb.leaves.contract(q, jnp.asarray(x), c), streamed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity=PER_CHANNEL),
                                  QuantSpec(bits=4, granularity=Group(128), symmetric=False),
                                  QuantSpec(bits=4, granularity=PER_CHANNEL),
                                  QuantSpec(bits=3, granularity=Group(64))], ids=str)
def test_a_decode_step_multiplies_integer_codes_and_keeps_float32_accuracy(spec):
    # activations spanning 6 decades (an outlier feature), up to MAX_ROWS rows; the codes as stored and,
    # for int8/int4 with one scale row along the input, in the decode layout
    rng = np.random.default_rng(0)
    k, n = 512, 24
    w = (rng.standard_t(3, size=(k, n)) + 0.2).astype(np.float32)
    q = jb.quant.quantize(w, spec)
    arranged = jb.quant.decode_layout(q)
    arrangeable = spec.bits in (4, 8) and not isinstance(spec.granularity, Group)
    assert isinstance(arranged, jb.quant.DecodeArray) == arrangeable and arranged.nbytes == q.nbytes
    dense = np.asarray(q.dense(), np.float64)
    c = jb.leaves.Contraction(jax.lax.dot_general, ((((1,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
    from jaxopt_big.quant import _matmul
    stored = jax.jit(lambda x, q: _matmul.streamed_matmul(c, x, q.values, q.stored_bits, q.scale32, q.zero_point))
    runs = [stored] + ([jax.jit(lambda x, d: _matmul.decode_matmul(c, x, d))] if arranged is not q else [])
    for run, kernel in zip(runs, [q, arranged]):
        for rows in (1, _matmul.MAX_ROWS):
            x = (rng.normal(size=(rows, k)) * 10.0 ** rng.uniform(-3, 3, (rows, k))).astype(np.float32)
            y = np.asarray(run(jnp.asarray(x), kernel))
            x64 = x.astype(np.float64)
            # float32 rounding: of each product (a dot's own error) and of each row's largest input (the planes)
            bound = (1e-6 * (np.abs(x64) @ np.abs(dense))
                     + 2e-7 * np.abs(x64).max(1, keepdims=True) * np.abs(dense).sum(0))
            assert np.all(np.abs(y - x64 @ dense) <= bound)
    # the codes are multiplied as integers (int8 x int8 -> int32), never converted to float
    hlo = stored.lower(jnp.zeros((1, k)), q).as_text()
    assert re.search(r"dot_general .*\(tensor<3x\d+xi8>, tensor<\d+x24xi8>\) -> tensor<3x24xi32>", hlo), hlo
    assert not re.search(r"convert .*tensor<\d+x24xi8>\) -> tensor<\d+x24xf32>", hlo)
    if arranged is not q:  # the decode layout: each output's codes (24 rows) contiguous, the left operand
        hlo = runs[1].lower(jnp.zeros((1, k)), arranged).as_text()
        assert re.search(r"dot_general .*\(tensor<24x\d+xi8>, tensor<3x\d+xi8>\) -> tensor<24x3xi32>", hlo), hlo
        assert not re.search(r"convert .*tensor<24x\d+xi8>\) -> tensor<24x\d+xf32>", hlo)


@pytest.mark.parametrize("bits, granularity", [(8, PER_CHANNEL), (4, PER_CHANNEL), (8, PER_TENSOR)])
def test_the_decode_layout_holds_each_outputs_codes_contiguously_in_the_same_bytes(bits, granularity):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(512, 6)).astype(np.float32)
    q = jb.quant.quantize(w, QuantSpec(bits=bits, granularity=granularity, symmetric=bits == 8))
    d = jb.quant.decode_layout({"a": {"kernel": q}})["a"]["kernel"]
    codes = np.asarray(q.int_values()).astype(np.int64)                      # (512, 6) signed codes
    tile = d.tile
    ref = codes.reshape(512 // tile, tile, 6).transpose(0, 2, 1)               # (tiles, out, tile)
    if bits == 4:                                                              # even input: low nibble
        ref = ((ref[..., 0::2] & 15) | ((ref[..., 1::2] & 15) << 4)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(d.codes), ref.astype(d.codes.dtype))
    assert d.nbytes == q.nbytes and d.shape == (512, 6) and d.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(d.dense()), np.asarray(q.dense()))
    x = rng.normal(size=(3, 2, 512)).astype(np.float32)                        # a few rows, and many: dense
    c = jb.leaves.Contraction(jax.lax.dot_general, ((((2,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
    run = jax.jit(lambda rows, d: jb.leaves.contract(d, rows, c))
    for rows in (x[:1, :1], x):
        np.testing.assert_allclose(run(jnp.asarray(rows), d), rows @ np.asarray(q.dense()), rtol=1e-5, atol=1e-5)


def test_a_long_int8_decode_row_does_not_overflow_its_int32_sums():
    k = 133_376  # 127 * 127 * k > 2**31: one int32 dot over the whole input would wrap around
    q = jb.quant.quantize(jnp.ones((k, 2)), QuantSpec(bits=8, granularity=PER_CHANNEL))
    d = jb.quant.decode_layout(q)
    c = jb.leaves.Contraction(jax.lax.dot_general, ((((1,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
    y = jax.jit(lambda x, d: jb.leaves.contract(d, x, c))(jnp.ones((1, k)), d)
    np.testing.assert_allclose(y, [[k, k]], rtol=1e-6)


def test_what_has_no_decode_layout_stays_as_it_is():
    w = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    keep = {"odd": jb.quant.quantize(w, QuantSpec(bits=3)), "short": jb.quant.quantize(w[:176], QuantSpec(
        bits=4, granularity=Group(128))), "grouped": jb.quant.quantize(w, QuantSpec(bits=4, granularity=Group(128))), "w8a8": jb.quant.quantize(w, QuantSpec(
        bits=8, granularity=PER_CHANNEL, activations=QuantSpec(bits=8, granularity=PER_TOKEN))), "float": w}
    assert all(v is keep[k] for k, v in jb.quant.decode_layout(keep).items())


def test_activation_planes_rebuild_the_rows_to_float32_rounding():
    from jaxopt_big.quant import _matmul
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 300)) * 10.0 ** rng.uniform(-8, 8, (4, 1))
    x[1] = 0.0                                                                      # an all-zero row
    x = x.astype(np.float32)
    planes, scales = _matmul.split_planes(jnp.asarray(x))
    assert planes.dtype == jnp.int8 and planes.shape == (_matmul.PLANES * 4, 300)
    assert np.abs(np.asarray(planes, np.int64)).max() <= 127
    rebuilt = (np.asarray(planes, np.float64) * np.asarray(scales, np.float64)).reshape(_matmul.PLANES, 4, 300).sum(0)
    assert np.all(np.abs(rebuilt - x) <= 2 ** -23 * np.abs(x).max(1, keepdims=True))
    bad = np.asarray(_matmul.split_planes(jnp.asarray([[1.0, np.inf], [np.nan, 0.0]]))[1])
    assert not np.isfinite(bad).any()                                                # inf or NaN is not hidden


def test_scales_are_stored_in_the_scale_dtype():
    w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    for dtype in ("float16", "bfloat16"):
        spec = QuantSpec(bits=4, granularity=Group(32), scale_dtype=dtype)
        q = jb.quant.quantize(w, spec)
        assert q.scale.dtype == jnp.dtype(dtype) and q.scale.shape == (2, 8)
        assert q.nbytes == 64 * 8 // 2 + 2 * 8 * 2
        assert jb.quant.layer_bytes({"d": {"kernel": w}}, bits=(4,), spec=spec) == {"d/kernel": {4: q.nbytes}}
        step = np.repeat(np.asarray(q.scale, np.float32), 32, axis=0)
        dense = np.clip(np.round(w / step), -7, 7) * step                      # float32 math on the stored scales
        np.testing.assert_allclose(q.dense(), dense, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(jb.quant.fake_quant(w, spec), dense, rtol=1e-6, atol=1e-6)
    # a given scale is rounded to the scale dtype first: the codes are those of the stored scale
    given = QuantSpec(bits=4, scale_dtype="float16").quantize(jnp.asarray(w), jnp.float32(0.1001))
    step = np.float32(np.float16(0.1001))
    np.testing.assert_array_equal(np.asarray(given.int_values()), np.clip(np.round(w / step), -7, 7))


@pytest.mark.parametrize("bits", [3, 5])
def test_leaves_stored_in_the_old_containers_still_decode(bits):
    # before: int3 two per byte (nibbles), int5 one int8 each, float32 scales with a scale_dtype set
    w = np.random.default_rng(bits).normal(size=(40, 3)).astype(np.float32)
    new = jb.quant.quantize(w, QuantSpec(bits=bits, granularity=PER_CHANNEL, scale_dtype="float16"))
    codes = np.asarray(new.int_values())
    if bits == 3:
        nibbles = (codes.astype(np.int64) & 15)
        old_values = jnp.asarray((nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8))
    else:
        old_values = jnp.asarray(codes.astype(np.int8))
    old = new.replace(values=old_values, scale=new.scale.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(old.int_values()), codes)
    np.testing.assert_array_equal(np.asarray(old.dense()), np.asarray(new.dense()))
    assert old.kind == ("int3 in int4" if bits == 3 else "int5 in int8")
    x = np.random.default_rng(0).normal(size=(1, 40)).astype(np.float32)
    c = jb.leaves.Contraction(jax.lax.dot_general, ((((1,), (0,)), ((), ())),), {}, conv=False, dtype=jnp.float32)
    np.testing.assert_allclose(jb.leaves.contract(old, jnp.asarray(x), c), x @ np.asarray(new.dense()), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"no packed int3 layout of 40 values.*uint8 with 15 rows"):
        new.replace(bits=3, values=jnp.zeros((16, 3), jnp.uint8)).int_values()  # neither layout: refused
