"""SmoothQuant: scales equal a numpy version of the reference; folding keeps the float output; W8A8 error drops."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_big as jb


def _np_int8(x: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric int8 absmax fake-quant with one scale per slice along ``axis`` (reduced axis)."""
    scale = np.abs(x).max(axis=axis, keepdims=True) / 127
    return np.clip(np.round(x / scale), -127, 127) * scale


def _w8a8(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-token int8 activations times per-output-channel int8 weights."""
    return _np_int8(x, axis=1) @ _np_int8(w, axis=0)


def _outlier_inputs(seed, rows=128, d_in=64, channels=(5, 40, 41), factor=60.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, d_in))
    x[:, list(channels)] *= factor
    return x, rng.normal(size=(d_in, 24)) * 0.1, rng.normal(size=(d_in, 8)) * 0.3


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.0])
def test_smoothquant_scales_equal_numpy_reference(alpha):
    x, w1, w2 = _outlier_inputs(0)
    act = np.abs(x).max(axis=0)
    weight = np.maximum(np.abs(w1).max(axis=1), np.abs(w2).max(axis=1))
    want = np.maximum(np.maximum(act, 1e-5) ** alpha / np.maximum(weight, 1e-5) ** (1 - alpha), 1e-5)
    got = jb.quant.smoothquant_scales(jnp.asarray(act, jnp.float32),
                                      [jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32)], alpha=alpha)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_folding_into_the_preceding_norm_keeps_the_float_output():
    x, w1, _ = _outlier_inputs(1)
    g = np.random.default_rng(2).uniform(0.5, 2.0, x.shape[1])
    s = jb.quant.smoothquant_scales(jnp.asarray(np.abs(x * g).max(0), jnp.float32), jnp.asarray(w1, jnp.float32))
    g2 = np.asarray(jb.quant.unscale_output_channels(jnp.asarray(g, jnp.float32), s), np.float64)
    w1s = np.asarray(jb.quant.scale_input_channels(jnp.asarray(w1, jnp.float32), s), np.float64)
    np.testing.assert_allclose((x * g2) @ w1s, (x * g) @ w1, rtol=1e-4, atol=1e-4)
    assert not np.allclose(g2, g)  # the scales really moved something


def test_smoothing_lowers_w8a8_error_with_activation_outlier_channels():
    x, w, _ = _outlier_inputs(3)
    s = np.asarray(jb.quant.smoothquant_scales(jnp.asarray(np.abs(x).max(0), jnp.float32),
                                               jnp.asarray(w, jnp.float32)), np.float64)
    exact = x @ w
    plain = np.sum((_w8a8(x, w) - exact) ** 2)
    smoothed = np.sum((_w8a8(x / s, w * s[:, None]) - exact) ** 2)
    assert smoothed < 0.25 * plain, (smoothed, plain)


def test_smoothquant_rejects_bad_input_naming_the_layer():
    w = jnp.ones((8, 4))
    with pytest.raises(ValueError, match=r"layers/0/mlp: SmoothQuant alpha must be .* in \[0, 1\], got 1.5"):
        jb.quant.smoothquant_scales(jnp.ones(8), w, alpha=1.5, path="layers/0/mlp")
    with pytest.raises(ValueError, match=r"attn: act_absmax has shape \(4,\), expected \(8,\)"):
        jb.quant.smoothquant_scales(jnp.ones(4), w, path="attn")
    with pytest.raises(ValueError, match=r"norm/scale: scales of shape \(8,\) do not match axis -1 of shape \(6,\)"):
        jb.quant.unscale_output_channels(jnp.ones(6), jnp.ones(8), path="norm/scale")
    with pytest.raises(ValueError, match="q_proj/kernel: scales of shape"):
        jb.quant.scale_input_channels(jnp.ones((6, 4)), jnp.ones(8), path="q_proj/kernel")
