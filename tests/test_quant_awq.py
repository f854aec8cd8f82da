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


def _np_weight_mean(kernels, group):
    """AutoAWQ's w_mean: |w| over its quantization group's max |w| (+1e-6), averaged over all output channels."""
    def normed(w):
        g = group or w.shape[0]
        blocks = np.abs(w).reshape(w.shape[0] // g, g, w.shape[1])
        return (blocks / (blocks.max(axis=1, keepdims=True) + 1e-6)).reshape(w.shape)
    return np.concatenate([normed(w) for w in kernels], axis=1).mean(axis=1)


def _np_awq(kernels, x, bits, group, grid=20, duo=False, joint=False):
    """The reference's loop: a = mean|x|, s = a^r clamped (duo: a^r / (w_mean^(1-r) + 1e-4)), s / sqrt(max s *
    min s), least output error: of each kernel's output summed, or (joint) of the sum of their outputs."""
    a = np.abs(x).mean(axis=0)
    w_mean = _np_weight_mean(kernels, group)
    best, best_s, errors = np.inf, None, []
    for i in range(grid):
        s = np.maximum(a ** (i / grid) / (w_mean ** (1 - i / grid) + 1e-4) if duo else a ** (i / grid), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        d = [x @ (_np_rtn(w * s[:, None], bits, group) / s[:, None]) - x @ w for w in kernels]
        err = np.sum(sum(d) ** 2) if joint else sum(np.sum(e ** 2) for e in d)
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


@pytest.mark.parametrize("bits,group,duo", [(4, 8, False), (3, None, False), (4, 8, True)])
def test_awq_equals_numpy_reference(bits, group, duo):
    x, w = _layer(0)
    w2 = np.random.default_rng(1).normal(size=(32, 5))
    spec = QuantSpec(bits=bits, granularity=Group(group) if group else PER_CHANNEL)
    found = jb.quant.awq_scales([jnp.asarray(w, jnp.float32), jnp.asarray(w2, jnp.float32)],
                                jnp.asarray(x.T @ x, jnp.float32), spec,
                                act_scale=jnp.asarray(np.abs(x).mean(0), jnp.float32), duo=duo)
    want_s, want_errors = _np_awq([w, w2], x, bits, group, duo=duo)
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
    x = jax.random.normal(jax.random.key(1), (64, 32))
    params = _QV().init(jax.random.key(2), x)["params"]
    params["norm"]["scale"] = params["norm"]["scale"].at[jnp.array([3, 17])].set(20.0)   # outlier channels
    params["v_proj"]["kernel"] = params["v_proj"]["kernel"].at[5, :4].mul(6.0)          # outlier weights
    spec = QuantSpec(bits=4, granularity=PER_CHANNEL)
    out, report = jb.oneshot.compress(_QV(), params, [x], jb.Recipe([jb.Rule(".*", jb.Plan(quant=jb.AWQ(spec)))]),
                                      progress=False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)
    h = xs / np.sqrt(np.mean(xs * xs, -1, keepdims=True) + 1e-6) * p["norm"]["scale"]
    # q and v feed no module but the block itself, whose output is their sum: the error of that sum, which
    # chooses another alpha than the layers' own errors do
    s, errors = _np_awq([p["q_proj"]["kernel"], p["v_proj"]["kernel"]], h, 4, None, duo=True, joint=True)
    layer = _np_awq([p["q_proj"]["kernel"], p["v_proj"]["kernel"]], h, 4, None, duo=True)[1]
    assert np.argmin(errors) != np.argmin(layer)
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
    assert jb.AWQ(int4, score="layer").score is jb.recipe.AWQScore.LAYER            # as a recipe file spells it
    assert jb.AWQ(int4).for_layer("mlp/up_proj").score is jb.recipe.AWQScore.MODULE  # the reference's default
    with pytest.raises(ValueError, match="AWQ.score must be one of module, block, layer, got 'output'"):
        jb.AWQ(int4, score="output")
    with pytest.raises(TypeError, match="AWQ.duo must be a bool, got 1"):
        jb.AWQ(int4, duo=1)


# --- the reference's module-output search, in a tiny pre-norm attention + MLP block ---

D, HEADS = 16, 2


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, h):
        q, k, v = (nn.Dense(D, use_bias=False, name=n)(h).reshape(*h.shape[:-1], HEADS, D // HEADS)
                   for n in ("q_proj", "k_proj", "v_proj"))
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS), axis=-1)
        return nn.Dense(D, use_bias=False, name="o_proj")(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(h.shape))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, h):
        gate, up = (nn.Dense(32, use_bias=False, name=n)(h) for n in ("gate_proj", "up_proj"))
        return nn.Dense(D, use_bias=False, name="down_proj")(jax.nn.silu(gate) * up)


class _Block(nn.Module):  # one Llama layer (multi-head: v_proj produces o_proj's input alone)
    @nn.compact
    def __call__(self, x):
        x = x + _Attention(name="self_attn")(nn.RMSNorm(name="input_layernorm")(x))
        return x + _MLP(name="mlp")(nn.RMSNorm(name="post_attention_layernorm")(x))


def _np_rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def _np_attention(h, p):
    """Attention output and the context o_proj reads."""
    q, k, v = (np.einsum("btd,de->bte", h, p[n]["kernel"]).reshape(*h.shape[:-1], HEADS, D // HEADS)
               for n in ("q_proj", "k_proj", "v_proj"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS)
    e = np.exp(s - s.max(-1, keepdims=True))
    ctx = np.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), v).reshape(h.shape)
    return ctx @ p["o_proj"]["kernel"], ctx


def _np_mlp(h, p):
    """MLP output and the input down_proj reads."""
    g, u = h @ p["gate_proj"]["kernel"], h @ p["up_proj"]["kernel"]
    inner = g / (1 + np.exp(-g)) * u
    return inner @ p["down_proj"]["kernel"], inner


def _np_module_search(x, p, names, module, bits):
    """AutoAWQ's _search_best_scale (duo scaling) on ``module(x, params)``: ``names``' kernels Q(W s) / s, the
    rest float."""
    a = np.abs(x).reshape(-1, x.shape[-1]).mean(0)
    w = _np_weight_mean([p[n]["kernel"] for n in names], None)
    want = module(x, p)
    errors, cands = [], []
    for i in range(20):
        s = np.maximum(a ** (i / 20) / (w ** (1 - i / 20) + 1e-4), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        q = {**p, **{n: {"kernel": _np_rtn(p[n]["kernel"] * s[:, None], bits, None) / s[:, None]} for n in names}}
        errors.append(np.sum((module(x, q) - want) ** 2))
        cands.append(s)
    return cands[int(np.argmin(errors))], np.array(errors)


def _np_awq_block(params, x, bits, layer_score=False):
    """Every group's scales from the float block (attention output for q/k/v, MLP output for gate/up, own
    output for o and down; or each layer's own output), folded, then round to nearest."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    attn, mlp = p["self_attn"], p["mlp"]
    x = np.asarray(x, np.float64)
    h1 = _np_rms(x, p["input_layernorm"]["scale"])
    _, ctx = _np_attention(h1, attn)
    h2 = _np_rms(x + _np_attention(h1, attn)[0], p["post_attention_layernorm"]["scale"])
    _, inner = _np_mlp(h2, mlp)

    def own(names):   # the layers' own outputs, summed
        return lambda x, q: np.concatenate([x @ q[n]["kernel"] for n in names], -1)
    search = {"qkv": (h1, attn, ("q_proj", "k_proj", "v_proj"), lambda x, q: _np_attention(x, q)[0]),
              "o": (ctx, attn, ("o_proj",), own(("o_proj",))),
              "gu": (h2, mlp, ("gate_proj", "up_proj"), lambda x, q: _np_mlp(x, q)[0]),
              "down": (inner, mlp, ("down_proj",), own(("down_proj",)))}
    found = {k: _np_module_search(x, q, names, own(names) if layer_score else module, bits)
             for k, (x, q, names, module) in search.items()}
    s = {k: v[0] for k, v in found.items()}
    kernels = {"q_proj": s["qkv"], "k_proj": s["qkv"], "v_proj": s["qkv"], "o_proj": s["o"],
               "gate_proj": s["gu"], "up_proj": s["gu"], "down_proj": s["down"]}
    outputs = {"v_proj": s["o"], "up_proj": s["down"]}
    out = {"input_layernorm": {"scale": p["input_layernorm"]["scale"] / s["qkv"]},
           "post_attention_layernorm": {"scale": p["post_attention_layernorm"]["scale"] / s["gu"]}}
    for module in ("self_attn", "mlp"):
        out[module] = {n: {"kernel": _np_rtn(w["kernel"] * kernels[n][:, None] / outputs.get(n, 1.0), bits, None)}
                       for n, w in p[module].items()}
    return out, {k: v[1] for k, v in found.items()}


def test_awq_scores_scales_on_the_module_output_as_the_reference():
    x = jax.random.normal(jax.random.key(2), (4, 8, D))
    params = _Block().init(jax.random.key(3), x)["params"]
    for norm in ("input_layernorm", "post_attention_layernorm"):  # outlier channels, as in LLMs
        params[norm]["scale"] = params[norm]["scale"].at[jnp.array([2, 11])].set(20.0)
    spec = QuantSpec(bits=3, granularity=PER_CHANNEL)
    out, report = jb.oneshot.compress(_Block(), params, [x[:2], x[2:]],
                                      jb.Recipe([jb.Rule(".*", jb.Plan(quant=jb.AWQ(spec, clip=False)))]),
                                      progress=False)
    # statistics once (the whole model feeds no next block), then per group the float block and 20 candidates
    assert report.block_passes == 1 + 4 * (1 + 20)
    want, errors = _np_awq_block(params, x, 3)
    layer = _np_awq_block(params, x, 3, layer_score=True)[1]
    # the layer-output score chooses otherwise for q/k/v and gate/up: this checks the module-output search
    assert [k for k in errors if np.argmin(errors[k]) != np.argmin(layer[k])] == ["qkv", "gu"]
    got = jax.tree.map(lambda a: np.asarray(jb.leaves.densify(a), np.float64), out, is_leaf=jb.leaves.is_compressed)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_a_recipe_file_sets_the_awq_score_and_duo(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[[rule]]\npattern = "a"\n[rule.quant]\nbits = 4\nmethod = "awq+gptq"\n'
                    'score = "layer"\nduo = false\n')
    awq = jb.recipe.load(path).rules[0].value.quant
    assert (awq.score, awq.duo, awq.quant.name) == (jb.recipe.AWQScore.LAYER, False, "gptq")
    path.write_text('[[rule]]\npattern = "a"\n[rule.quant]\nbits = 4\nmethod = "awq"\nscore = "output"\n')
    with pytest.raises(jb.recipe.RecipeFileError, match="recipe.toml:6: AWQ.score must be one of module, block"):
        jb.recipe.load(path)
