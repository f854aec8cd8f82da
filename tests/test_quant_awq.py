"""AWQ scale search: equal to a numpy version of the reference's search, better than RTN on outlier channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_big as jb
from jaxopt_big.quant import PER_CHANNEL, Group, QuantSpec


def _np_rtn(w: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    """Symmetric narrow absmax round-to-nearest, one scale per output column (and input group)."""
    d_in, d_out = w.shape
    g = group or d_in
    blocks = w.reshape(d_in // g, g, d_out)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(blocks).max(axis=1, keepdims=True) / qmax
    return (np.clip(np.round(blocks / scale), -qmax, qmax) * scale).reshape(d_in, d_out)


def _np_awq(kernels, x, bits, group, grid=20):
    """The reference's loop: a = mean|x|, s = a^r clamped, s / sqrt(max s * min s), least output error."""
    a = np.abs(x).mean(axis=0)
    best, best_s, errors = np.inf, None, []
    for i in range(grid):
        s = np.maximum(a ** (i / grid), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        err = sum(np.sum((x @ (_np_rtn(w * s[:, None], bits, group) / s[:, None]) - x @ w) ** 2) for w in kernels)
        errors.append(err)
        if err < best:
            best, best_s = err, s
    return best_s, np.array(errors)


def _layer(seed, d_in=32, outliers=(3, 17), factor=50.0, rows=256):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, d_in)) * rng.uniform(0.5, 1.5, d_in)
    x[:, list(outliers)] *= factor
    w = rng.normal(size=(d_in, 12))
    return x, w


@pytest.mark.parametrize("bits,group", [(4, 8), (3, None)])
def test_awq_equals_numpy_reference(bits, group):
    x, w = _layer(0)
    w2 = np.random.default_rng(1).normal(size=(32, 5))
    spec = QuantSpec(bits=bits, granularity=Group(group) if group else PER_CHANNEL)
    found = jb.quant.awq_scales([jnp.asarray(w, jnp.float32), jnp.asarray(w2, jnp.float32)],
                                jnp.asarray(x.T @ x, jnp.float32), spec,
                                act_scale=jnp.asarray(np.abs(x).mean(0), jnp.float32))
    want_s, want_errors = _np_awq([w, w2], x, bits, group)
    np.testing.assert_allclose(found.errors, want_errors, rtol=2e-3)
    np.testing.assert_allclose(found.scales, want_s, rtol=1e-4)
    assert float(found.alpha) == pytest.approx(np.argmin(want_errors) / 20)


def test_awq_beats_rtn_on_planted_outlier_channels_on_held_out_inputs():
    x, w = _layer(2, rows=512)
    calib, held_out = x[:256], x[256:]
    spec = QuantSpec(bits=4, granularity=Group(16))
    found = jb.quant.awq_scales(jnp.asarray(w, jnp.float32), jnp.asarray(calib.T @ calib, jnp.float32), spec,
                                act_scale=jnp.asarray(np.abs(calib).mean(0), jnp.float32))
    s = np.asarray(found.scales, np.float64)
    # applied as it is deployed: the input divided by s (folded upstream), the scaled kernel quantized
    folded = np.asarray(jb.quant.scale_input_channels(jnp.asarray(w, jnp.float32), found.scales))
    awq_out = (held_out / s) @ np.asarray(spec.fake_quant(jnp.asarray(folded)), np.float64)
    rtn_out = held_out @ _np_rtn(w, 4, 16)
    awq_err, rtn_err = np.sum((awq_out - held_out @ w) ** 2), np.sum((rtn_out - held_out @ w) ** 2)
    assert float(found.alpha) > 0
    assert awq_err < 0.7 * rtn_err, (awq_err, rtn_err)


def test_awq_without_act_scale_uses_the_hessian_rms_and_runs_under_jit():
    x, w = _layer(3)
    h, w = jnp.asarray(x.T @ x, jnp.float32), jnp.asarray(w, jnp.float32)
    spec = QuantSpec(bits=4, granularity=PER_CHANNEL)
    rms = jnp.sqrt(jnp.diagonal(h) / x.shape[0])  # a constant factor away from sqrt(diag H): same scales
    a = jb.quant.awq_scales(w, h, spec)
    b = jax.jit(lambda w, h, r: jb.quant.awq_scales(w, h, spec, act_scale=r))(w, h, rms)
    np.testing.assert_allclose(a.scales, b.scales, rtol=1e-5)
    assert float(a.errors.min()) < float(a.errors[0])


def test_awq_rejects_bad_input_naming_the_layer():
    w, h = jnp.ones((8, 4)), jnp.eye(8)
    spec = QuantSpec(bits=4, granularity=PER_CHANNEL)
    with pytest.raises(ValueError, match=r"mlp/up_proj: hessian has shape \(4, 4\), expected \(8, 8\)"):
        jb.quant.awq_scales(w, jnp.eye(4), spec, path="mlp/up_proj")
    with pytest.raises(ValueError, match="q_proj: act_scale must be >= 0"):
        jb.quant.awq_scales(w, h, spec, act_scale=-jnp.ones(8), path="q_proj")
    with pytest.raises(ValueError, match=r"qkv: AWQ needs 2-d kernels .* \[\(8, 4\), \(6, 4\)\]"):
        jb.quant.awq_scales([w, jnp.ones((6, 4))], h, spec, path="qkv")
    short = jb.quant.awq_scales(w, h, QuantSpec(bits=4, granularity=Group(3)), path="o_proj")  # 3+3+2 inputs
    assert short.scales.shape == (8,) and bool(jnp.all(jnp.isfinite(short.scales)))
    with pytest.raises(ValueError, match="down: AWQ inputs contain NaN"):
        jb.quant.awq_scales(w.at[0, 0].set(jnp.nan), h, spec, path="down")
