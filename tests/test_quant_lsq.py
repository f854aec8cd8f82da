"""LSQ / LSQ+: step-size and offset gradients against finite differences, export, 2-bit digits QAT."""

import digits_util as du
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_big as jb
from jaxopt_big.quant import LSQ, PER_CHANNEL, PER_TENSOR, AbsMax, Learned, MinMax, QArray, QuantSpec, lsq, lsq_export
from jaxopt_big.tree import Rule


def _inside(v, qmin, qmax):
    """``v`` where it is within half a step of ``[qmin, qmax]`` (not clipped), else its clip."""
    return np.where(np.abs(v - np.clip(v, qmin, qmax)) <= 0.5, v, np.clip(v, qmin, qmax))


def _surrogate(x, s, beta, u, qmin, qmax, r0):
    """Numpy float64 LSQ surrogate: the rounding residual frozen at the evaluation point."""
    return np.sum(u * ((_inside((x - beta) / s, qmin, qmax) + r0) * s + beta))


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_step_and_offset_gradients_match_finite_differences(symmetric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4))
    u = rng.standard_normal((6, 4))
    fmt = LSQ(spec=QuantSpec(bits=3, symmetric=symmetric, granularity=PER_CHANNEL))
    s = np.array([[0.3, 0.5, 0.2, 0.4]])
    beta = None if symmetric else np.array([[0.1, -0.2, 0.05, 0.0]])
    b = 0.0 if beta is None else beta
    qmin, qmax = fmt.spec.qmin, fmt.spec.qmax
    v0 = _inside((x - b) / s, qmin, qmax)
    r0 = np.clip(np.round(v0), qmin, qmax) - v0
    g = 1 / np.sqrt(6 * qmax)  # 6 weights per channel step

    def loss(s_, beta_):
        return jnp.sum(jnp.asarray(u, jnp.float32) * fmt.fake_quant(jnp.asarray(x, jnp.float32), s_, beta_))

    args = (jnp.asarray(s, jnp.float32), None if beta is None else jnp.asarray(beta, jnp.float32))
    grads = jax.grad(loss, argnums=(0,) if symmetric else (0, 1))(*args)
    h = 1e-6
    for which, value in enumerate([s] if symmetric else [s, beta]):
        fd = np.zeros_like(value)
        for c in range(value.shape[1]):
            e = np.zeros_like(value)
            e[0, c] = h
            plus = [s + e, b] if which == 0 else [s, b + e]
            minus = [s - e, b] if which == 0 else [s, b - e]
            fd[0, c] = (_surrogate(x, *plus, u, qmin, qmax, r0) - _surrogate(x, *minus, u, qmin, qmax, r0)) / (2 * h)
        np.testing.assert_allclose(np.asarray(grads[which]), g * fd, rtol=1e-4, atol=1e-5)
    # The paper's closed form for the step: round(v) - v inside, qmin/qmax at the clip (a value is
    # clipped when it lies beyond [qmin, qmax] by more than rounding, half a step).
    v = (x - b) / s
    per = np.where(v < qmin - 0.5, qmin, np.where(v > qmax + 0.5, qmax, np.clip(np.round(v), qmin, qmax) - v))
    assert np.any((np.abs(v) > qmax) & (np.abs(v) < qmax + 0.5))  # the band the rule is about is exercised
    np.testing.assert_allclose(np.asarray(grads[0]), g * (u * per).sum(0, keepdims=True), rtol=1e-4, atol=1e-5)


def test_lsq_weight_gradient_is_straight_through_inside_the_range():
    x = jnp.array([0.2, 0.9, -3.0, 5.0])
    grad = jax.grad(lambda x: LSQ(spec=QuantSpec(bits=2)).fake_quant(x, jnp.array(1.0)).sum())(x)
    assert grad.tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_wraps_trains_and_exports_to_an_equal_qarray(symmetric):
    w = jax.random.normal(jax.random.key(0), (16, 8))
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=PER_CHANNEL)
    tree = lsq({"d": {"kernel": w, "bias": jnp.zeros(8)}}, spec)
    leaf = tree["d"]["kernel"]
    assert isinstance(leaf, Learned) and tree["d"]["bias"].shape == (8,)
    # Initialised from the calibrator.
    scale, zp = spec.calibrate(w)
    np.testing.assert_allclose(leaf.scale, scale)
    assert (leaf.offset is None) == symmetric
    # A perturbed learned grid exports to a QArray whose dense value equals the fake-quantized one.
    leaf = leaf.replace(scale=leaf.scale * 0.8, offset=None if symmetric else leaf.offset + 0.01)
    exported = lsq_export({"k": leaf})["k"]
    assert isinstance(exported, QArray) and exported.bits == 4
    np.testing.assert_allclose(exported.dense(), leaf.dense(), atol=1e-6)
    assert len(np.unique(np.asarray(exported.dense())[:, 0])) <= 16


def test_lsq_rules_and_bad_spec():
    p = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    out = lsq(p, [Rule("a/.*", LSQ(spec=QuantSpec(bits=3)))])
    assert isinstance(out["a"]["kernel"], Learned) and not isinstance(out["b"]["kernel"], Learned)
    with pytest.raises(TypeError, match="a/kernel"):
        lsq(p, [Rule("a/.*", "int4")])


def test_two_bit_lsq_qat_on_digits_at_least_as_accurate_as_ste_with_fixed_absmax(digits):
    # One step per layer, as in Esser et al. Per channel, both end within about a test sample of
    # float, so their order there is float rounding noise that changes with the CPU.
    _, apply, params, dense_acc = du.dense_cnn()
    train, test = digits
    spec = QuantSpec(bits=2, granularity=PER_TENSOR)
    fixed = {k: spec.calibrate(v["kernel"])[0] for k, v in params.items()}

    def ste_apply(p, x):
        return apply({k: {**v, "kernel": spec.fake_quant(v["kernel"], fixed[k])} for k, v in p.items()}, x)

    ste_acc = du.accuracy(ste_apply, du.fit(ste_apply, params, train, epochs=3, lr=1e-3), test)
    lsq_apply = lambda p, x: apply(jb.leaves.densify(p), x)
    trained = du.fit(lsq_apply, lsq(params, spec), train, epochs=3, lr=1e-3)
    lsq_acc = du.accuracy(lsq_apply, trained, test)
    packed = lsq_export(trained)
    assert du.accuracy(apply, jb.leaves.densify(packed), test) == lsq_acc
    print(f"digits CNN 2-bit per-tensor: float {dense_acc:.4f}, STE fixed absmax {ste_acc:.4f}, LSQ {lsq_acc:.4f}")
    assert lsq_acc > ste_acc  # equal if the steps did not learn (LSQ starts at the same absmax steps)


@pytest.mark.parametrize("symmetric, calibration", [(True, AbsMax()), (False, MinMax()), (False, AbsMax())])
def test_lsq_at_init_keeps_the_gradient_of_every_weight(symmetric, calibration):
    # absmax / 127 * 127 falls one float32 ulp short of 0.24812406; affine grids round their zero point.
    w = jax.random.uniform(jax.random.key(0), (16, 64), minval=-0.2, maxval=0.2).at[0].set(0.24812406)
    spec = QuantSpec(bits=8, symmetric=symmetric, granularity=PER_CHANNEL, calibration=calibration)
    grads = jax.grad(lambda t: jb.leaves.densify(t)["d"]["kernel"].sum())(lsq({"d": {"kernel": w}}, spec))
    np.testing.assert_allclose(grads["d"]["kernel"].weight, np.ones(w.shape), rtol=1e-6)  # x / s * s


@pytest.mark.parametrize("scale, error", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                          (True, TypeError)])
def test_lsq_checks_a_given_step(scale, error):
    x = jnp.array([0.3, -0.7])
    with pytest.raises(error, match=f"d/kernel: scale must be .*{scale}"):
        LSQ(spec=QuantSpec(bits=4)).fake_quant(x, scale, path="d/kernel")
    leaf = lsq({"d": {"kernel": x.reshape(1, 2)}}, QuantSpec(bits=4), where=".*")["d"]["kernel"]
    with pytest.raises(error, match="d/kernel: scale must be"):
        leaf.replace(scale=jnp.asarray(scale)).dense()


def test_lsq_leaves_compressed_leaves_alone_and_refuses_to_select_them():
    p = {"q": {"kernel": jnp.ones((4, 4))}, "f": {"kernel": jnp.ones((4, 4))}}
    mixed = jb.quant.quantize_params(p, [Rule("q", QuantSpec())])
    out = lsq(mixed, QuantSpec(bits=4))
    assert out["q"]["kernel"] is mixed["q"]["kernel"] and isinstance(out["f"]["kernel"], Learned)
    with pytest.raises(ValueError, match="q/kernel is a compressed QArray"):
        lsq(mixed, QuantSpec(bits=4), where="q")
