"""AWQ scale search: equal to a numpy version of the reference's search, better than RTN on outlier channels."""

import jax
import jax.numpy as jnp
import flax.linen as nn
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


def _np_affine(w: np.ndarray, bits: int) -> np.ndarray:
    """Min/max affine round to nearest, one scale and integer zero point per column."""
    half, n = 2 ** (bits - 1), np.float32(2 ** bits - 1)
    lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
    scale = hi / n - lo / n
    zero = np.round(-half - lo / scale)
    return (np.clip(np.round(w / scale) + zero, -half, half - 1) - zero) * scale


def _np_clip(w, x, quant, group, grid=20, max_shrink=0.5):
    """The reference's clip loop, per input group and output column, on every row of x: clip to r * max|w|,
    quantize, keep the r with the least squared error of the group's partial output (first minimum)."""
    out, ratios = w.copy(), []
    for start in range(0, w.shape[0], group):
        wg, xg = w[start:start + group], x[:, start:start + group].astype(np.float64)
        peak, best, best_r = np.abs(wg).max(0), np.full(w.shape[1], np.inf), np.ones(w.shape[1], w.dtype)
        for i in range(int(max_shrink * grid)):
            r = np.float32(1) - np.float32(i) / np.float32(grid)
            err = np.sum((xg @ (quant(np.clip(wg, -r * peak, r * peak)) - wg)) ** 2, axis=0)
            best_r, best = np.where(err < best, r, best_r), np.minimum(err, best)
        out[start:start + group] = np.clip(wg, -best_r * peak, best_r * peak)
        ratios.append(best_r)
    return out, np.array(ratios)


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_clip_equals_numpy_reference_with_a_short_last_group(symmetric):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(128, 20)) * rng.uniform(0.3, 3.0, 20)
    w = rng.standard_t(3, size=(20, 6)).astype(np.float32)   # heavy tails: some groups gain from clipping
    # affine: non-negative weights, so the zero point is not the tie (-1/2) that a range clipped on both
    # sides gives, which float rounding breaks either way
    w = w if symmetric else np.abs(w)
    group = 8 if symmetric else 20               # 8 + 8 + 4 inputs; or one group per column
    spec = QuantSpec(bits=3, symmetric=symmetric, granularity=Group(group) if symmetric else PER_CHANNEL)
    quant = (lambda v: _np_rtn(v, 3, None)) if symmetric else (lambda v: _np_affine(v, 3))
    found = jb.quant.awq_clip(jnp.asarray(w), jnp.asarray(x.T @ x, jnp.float32), spec)
    want, ratios = _np_clip(w, x, quant, group)
    np.testing.assert_allclose(found.ratios, ratios, atol=1e-6)
    np.testing.assert_allclose(found.kernel, want, rtol=1e-5, atol=1e-6)
    assert 0 < np.mean(ratios < 1) < 1                       # the search chose, both ways
    assert found.errors.shape == (10, ratios.shape[0], 6)


class _QV(nn.Module):  # a norm, then q and v projections reading it (one group: one fold, one set of scales)
    @nn.compact
    def __call__(self, x):
        h = nn.RMSNorm(name="norm")(x)
        return nn.Dense(12, use_bias=False, name="q_proj")(h) + nn.Dense(12, use_bias=False, name="v_proj")(h)


def test_awq_in_the_engine_scales_then_clips_all_but_q_and_k_as_numpy_does():
    x = jax.random.normal(jax.random.key(0), (64, 32))
    params = _QV().init(jax.random.key(1), x)["params"]
    params["norm"]["scale"] = params["norm"]["scale"].at[jnp.array([3, 17])].set(20.0)   # outlier channels
    params["v_proj"]["kernel"] = params["v_proj"]["kernel"].at[5, :4].mul(6.0)          # outlier weights
    spec = QuantSpec(bits=4, granularity=PER_CHANNEL)
    out, report = jb.oneshot.compress(_QV(), params, [x], jb.Recipe([jb.Rule(".*", jb.Plan(quant=jb.AWQ(spec)))]),
                                      progress=False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)
    h = xs / np.sqrt(np.mean(xs * xs, -1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    s, _ = _np_awq([p["q_proj"]["kernel"], p["v_proj"]["kernel"]], h, 4, None)
    v_clipped, ratios = _np_clip(p["v_proj"]["kernel"] * s[:, None], h / s, lambda v: _np_rtn(v, 4, None), 32)
    got = jax.tree.map(lambda a: np.asarray(jb.leaves.densify(a), np.float64), out, is_leaf=jb.leaves.is_compressed)
    np.testing.assert_allclose(got["norm"]["scale"], p["norm"]["scale"] / s, rtol=1e-4)
    np.testing.assert_allclose(got["q_proj"]["kernel"], _np_rtn(p["q_proj"]["kernel"] * s[:, None], 4, None),
                               rtol=1e-4, atol=1e-6)   # q: scaled, not clipped
    np.testing.assert_allclose(got["v_proj"]["kernel"], _np_rtn(v_clipped, 4, None), rtol=1e-4, atol=1e-6)
    assert np.any(ratios < 1) and [r.method for r in report.rows] == ["awq clip + rtn int4"] * 2


def test_awq_clips_before_round_to_nearest_not_before_gptq_unless_asked():
    int4 = QuantSpec(bits=4, granularity=Group(128))
    assert jb.AWQ(int4).clip and not jb.AWQ(jb.GPTQ(int4)).clip and jb.AWQ(jb.GPTQ(int4), clip=True).clip
    assert jb.AWQ(int4).for_layer("layer_0/attention/self/key").clip is False
    assert jb.AWQ(int4).for_layer("layers/1/self_attn/o_proj") == jb.AWQ(int4)
    with pytest.raises(TypeError, match="AWQ.clip .* must be a bool, got 'yes'"):
        jb.AWQ(int4, clip="yes")
    with pytest.raises(ValueError, match=r"AWQ.max_shrink must be in \(0, 1\], got 0.0"):
        jb.AWQ(int4, max_shrink=0.0)
    with pytest.raises(ValueError, match=r"AWQ.no_clip is not a valid regex: '\(q_proj'"):
        jb.AWQ(int4, no_clip="(q_proj")
