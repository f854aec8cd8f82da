"""Distillation losses and the combinator, against numpy references and analytic gradients."""

import re

import chex
import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big import distill

CE = optax.softmax_cross_entropy_with_integer_labels


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_kd(s, t, temp):
    p_t, p_s = np_softmax(t / temp), np_softmax(s / temp)
    return temp ** 2 * (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()


def logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float64) * scale


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(rows=st.integers(1, 6), classes=st.integers(2, 7), temp=st.floats(0.5, 8.0), seed=st.integers(0, 99))
def test_kd_loss_matches_numpy(rows, classes, temp, seed):
    s, t = logits(seed, (rows, classes)), logits(seed + 1, (rows, classes))
    got = distill.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temp)
    np.testing.assert_allclose(float(got), np_kd(s, t, temp), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_gradient_is_analytic(temp):
    s, t = jnp.asarray(logits(0, (5, 4)), jnp.float32), jnp.asarray(logits(1, (5, 4)), jnp.float32)
    g_s, g_t = jax.grad(distill.kd_loss, argnums=(0, 1))(s, t, temp)
    expected = (np_softmax(np.asarray(s, np.float64) / temp) - np_softmax(np.asarray(t, np.float64) / temp)) * temp / 5
    np.testing.assert_allclose(np.asarray(g_s), expected, rtol=1e-4, atol=1e-6)
    assert not np.any(np.asarray(g_t))  # teacher is under stop_gradient


def test_kd_loss_stable_for_huge_logits_and_zero_when_equal():
    s = jnp.array([[1e4, -1e4, 0.0]])
    assert np.isfinite(float(distill.kd_loss(s, -s, 1.0)))
    assert float(distill.kd_loss(s, s, 3.0)) == 0.0


def test_kd_mask_averages_real_rows_only():
    s, t = logits(2, (6, 3)), logits(3, (6, 3))
    mask = np.array([1, 0, 1, 1, 0, 0], bool)
    got = distill.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), 2.0, mask=mask)
    np.testing.assert_allclose(float(got), np_kd(s[mask], t[mask], 2.0), rtol=1e-4)


def test_feature_losses_match_numpy():
    s, t = logits(4, (3, 2, 2, 5), 1.0), logits(5, (3, 2, 2, 5), 1.0)
    fs, ft = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(float(distill.feature_loss(fs, ft)), ((s - t) ** 2).mean(), rtol=1e-5)
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(float(distill.feature_loss(fs, ft, kind=distill.FeatureLoss.COSINE)),
                               (1 - cos).mean(), rtol=1e-5)


def test_projection_maps_student_width_and_gets_gradients():
    s, t = jnp.asarray(logits(6, (4, 3), 1.0), jnp.float32), jnp.asarray(logits(7, (4, 5), 1.0), jnp.float32)
    proj = distill.init_projection(jax.random.key(0), 3, 5)
    got = distill.feature_loss(s, t, projection=proj)
    ref = ((np.asarray(s) @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"]) - np.asarray(t)) ** 2).mean()
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    grads = jax.grad(lambda p: distill.feature_loss(s, t, projection=p))(proj)
    assert float(jnp.abs(grads["kernel"]).sum()) > 0
    with pytest.raises(ValueError, match=re.escape("(4, 3)") + ".*" + re.escape("(4, 5)")):
        distill.feature_loss(s, t)


def np_attention(x):
    q = (x ** 2).mean(-1).reshape(len(x), -1)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def test_attention_transfer_matches_numpy_and_ignores_channel_count():
    s, t = logits(8, (2, 4, 4, 3), 1.0), logits(9, (2, 4, 4, 7), 1.0)
    got = distill.attention_transfer(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(float(got), ((np_attention(s) - np_attention(t)) ** 2).mean(), rtol=1e-4)
    via_kind = distill.feature_loss(jnp.asarray(s), jnp.asarray(t), kind=distill.FeatureLoss.ATTENTION)
    np.testing.assert_allclose(float(via_kind), float(got), rtol=1e-6)
    with pytest.raises(ValueError, match=re.escape("(2, 4, 4, 3)")):
        distill.attention_transfer(jnp.asarray(s), jnp.ones((2, 2, 2, 3)))


# --- combine -------------------------------------------------------------------------------------

MLP = jb.models.MLP(features=(16,))
TEACHER = jb.models.MLP(features=(24, 8))
X = jnp.asarray(np.random.default_rng(0).normal(size=(12, 6)), jnp.float32)
Y = jnp.asarray(np.arange(12) % 10, jnp.int32)
S_PARAMS = MLP.init(jax.random.key(1), X)["params"]
T_PARAMS = TEACHER.init(jax.random.key(2), X)["params"]


def student(p, x):
    return MLP.apply({"params": p}, x)


def teacher(x):
    return TEACHER.apply({"params": T_PARAMS}, x)


def test_alpha_one_is_the_task_loss_exactly():
    loss_fn = distill.combine(CE, teacher, student=student, alpha=1.0, temperature=4.0)
    ours = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(S_PARAMS, (X, Y))
    plain = jax.jit(jax.value_and_grad(jb.train.classifier_loss(student), has_aux=True))(S_PARAMS, (X, Y))
    assert float(ours[0][0]) == float(plain[0][0])
    chex.assert_trees_all_equal(ours[1], plain[1])


def test_combine_weights_task_and_kd():
    loss_fn = distill.combine(CE, teacher, student=student, alpha=0.3, temperature=2.0)
    loss, aux = jax.jit(loss_fn)(S_PARAMS, (X, Y))
    s, t = np.asarray(student(S_PARAMS, X), np.float64), np.asarray(teacher(X), np.float64)
    ce = -np.log(np_softmax(s)[np.arange(12), np.asarray(Y)]).mean()
    np.testing.assert_allclose(float(aux["task"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kd"]), np_kd(s, t, 2.0), rtol=1e-4)
    np.testing.assert_allclose(float(loss), 0.3 * ce + 0.7 * np_kd(s, t, 2.0), rtol=1e-4)


def test_cached_teacher_equals_teacher_in_step_and_labeled_mask():
    labeled = np.arange(12) % 3 == 0
    in_step = distill.combine(CE, teacher, student=student, alpha=0.5, temperature=3.0)
    cached = distill.combine(CE, None, student=student, alpha=0.5, temperature=3.0)
    targets = distill.precompute(teacher, X, batch_size=5)
    a = jax.jit(in_step)(S_PARAMS, distill.Batch(X, Y, labeled=labeled))
    b = jax.jit(cached)(S_PARAMS, {"x": X, "y": Y, "labeled": labeled, "teacher": targets})
    chex.assert_trees_all_close(a, b, rtol=1e-6)
    s = np.asarray(student(S_PARAMS, X), np.float64)
    ce_labeled = -np.log(np_softmax(s)[np.arange(12), np.asarray(Y)])[labeled].mean()
    np.testing.assert_allclose(float(a[1]["task"]), ce_labeled, rtol=1e-5)


def test_linen_features_with_projection_match_manual_hidden_layers_and_train():
    feats = (distill.Feature(student="Dense_0", teacher="Dense_1", projection=lambda p: p["proj"]),
             distill.Feature(student="Dense_0", teacher="Dense_0", kind=distill.FeatureLoss.COSINE, weight=0.5,
                             projection=lambda p: p["proj_wide"]))
    params = {"student": S_PARAMS, "proj": distill.init_projection(jax.random.key(3), 16, 8),
              "proj_wide": distill.init_projection(jax.random.key(4), 16, 24)}
    loss_fn = distill.combine(CE, teacher, student=lambda p, x: student(p["student"], x), alpha=0.5,
                              temperature=2.0, features=feats)
    loss, aux = jax.jit(loss_fn)(params, (X, Y))

    x = np.asarray(X)
    h_s = x @ np.asarray(S_PARAMS["Dense_0"]["kernel"]) + np.asarray(S_PARAMS["Dense_0"]["bias"])
    t0 = x @ np.asarray(T_PARAMS["Dense_0"]["kernel"]) + np.asarray(T_PARAMS["Dense_0"]["bias"])
    t1 = np.maximum(t0, 0) @ np.asarray(T_PARAMS["Dense_1"]["kernel"]) + np.asarray(T_PARAMS["Dense_1"]["bias"])
    mse = ((h_s @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"]) - t1) ** 2).mean()
    wide = h_s @ np.asarray(params["proj_wide"]["kernel"])
    cos = 1 - (wide * t0).sum(-1) / (np.linalg.norm(wide, axis=-1) * np.linalg.norm(t0, axis=-1))
    np.testing.assert_allclose(float(aux["feature/Dense_0->Dense_1"]), mse, rtol=1e-4)
    np.testing.assert_allclose(float(loss), 0.5 * aux["task"] + 0.5 * aux["kd"] + mse + 0.5 * cos.mean(), rtol=1e-4)

    tx = optax.adam(1e-2)
    step = jb.train.make_step(loss_fn, tx, donate=False)  # params are shared module constants
    state = jb.train.TrainState.create(params, tx)
    for _ in range(30):
        state, metrics = step(state, (X, Y))
    assert float(metrics["loss"]) < 0.7 * float(loss)
    assert not np.allclose(state.params["proj"]["kernel"], params["proj"]["kernel"])


def test_nnx_student_and_teacher_features():
    s_model = jb.models.NnxMLP(6, features=(16,), rngs=nnx.Rngs(0))
    t_model = jb.models.NnxMLP(6, features=(16, 8), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(s_model)
    feats = (distill.Feature(student="layers/0", teacher="layers/0"),)
    loss_fn = distill.combine(CE, t_model, student=distill.NnxApply(graphdef), alpha=0.5, temperature=2.0,
                              features=feats)
    loss, aux = loss_fn(state, (X, Y))
    h_s = s_model.layers[0](X)
    h_t = t_model.layers[0](X)
    np.testing.assert_allclose(float(aux["feature/layers/0->layers/0"]), float(((h_s - h_t) ** 2).mean()), rtol=1e-5)
    np.testing.assert_allclose(float(aux["kd"]), np_kd(np.asarray(s_model(X), np.float64),
                                                       np.asarray(t_model(X), np.float64), 2.0), rtol=1e-4)
    grads = jax.grad(lambda s: loss_fn(s, (X, Y))[0])(state)
    assert float(jnp.abs(grads["layers"][0]["kernel"].get_value()).sum()) > 0
    # cached teacher features are keyed by the teacher pattern
    targets = distill.precompute(t_model, X, features=feats)
    cached = distill.combine(CE, None, student=distill.NnxApply(graphdef), alpha=0.5, temperature=2.0,
                             features=feats)
    chex.assert_trees_all_close(cached(state, distill.Batch(X, Y, teacher=targets)), (loss, aux), rtol=1e-5)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_bad_temperature(temp):
    with pytest.raises(ValueError, match="temperature"):
        distill.kd_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), temp)
    with pytest.raises(ValueError, match="temperature"):
        distill.combine(CE, teacher, student=student, alpha=0.5, temperature=temp)


@pytest.mark.parametrize("alpha, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                          (True, TypeError), ("0.5", TypeError)])
def test_bad_alpha(alpha, error):
    with pytest.raises(error, match="alpha"):
        distill.combine(CE, teacher, student=student, alpha=alpha, temperature=1.0)


def test_mismatched_logits_shapes_are_named():
    with pytest.raises(ValueError, match=re.escape("(2, 3)") + ".*" + re.escape("(2, 4)")):
        distill.kd_loss(jnp.ones((2, 3)), jnp.ones((2, 4)), 1.0)
    wrong_teacher = distill.combine(CE, lambda x: jnp.zeros((len(x), 7)), student=student, alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match=re.escape("(12, 10)") + ".*" + re.escape("(12, 7)")):
        wrong_teacher(S_PARAMS, (X, Y))


def test_feature_patterns_that_match_nothing_list_captured_names():
    def loss_with(feature):
        return distill.combine(CE, teacher, student=student, alpha=0.5, temperature=1.0, features=(feature,))

    with pytest.raises(ValueError, match="Conv_0.*Dense_0.*Dense_1"):
        loss_with(distill.Feature(student="Conv_0", teacher="Dense_0"))(S_PARAMS, (X, Y))
    with pytest.raises(ValueError, match="Dense_7.*Dense_0.*Dense_1.*Dense_2"):
        jax.jit(loss_with(distill.Feature(student="Dense_0", teacher="Dense_7")))(S_PARAMS, (X, Y))
    with pytest.raises(ValueError, match="exactly one.*Dense_0.*Dense_1"):
        loss_with(distill.Feature(student="Dense_.", teacher="Dense_0"))(S_PARAMS, (X, Y))
    cached = distill.combine(CE, None, student=student, alpha=0.5, temperature=1.0,
                             features=(distill.Feature(student="Dense_0", teacher="Dense_1"),))
    with pytest.raises(ValueError, match="Dense_1.*cached: \\['Dense_0'\\]"):
        cached(S_PARAMS, distill.Batch(X, Y, teacher=distill.TeacherTargets(teacher(X), {"Dense_0": X})))
    with pytest.raises(ValueError, match="batch.teacher"):
        cached(S_PARAMS, (X, Y))


def test_bad_feature_options_fail_at_construction():
    with pytest.raises(ValueError, match="weight"):
        distill.Feature(student="a", teacher="b", weight=-1.0)
    with pytest.raises(TypeError, match="FeatureLoss"):
        distill.Feature(student="a", teacher="b", kind="mse")
    with pytest.raises(ValueError, match="invalid regex"):
        distill.Feature(student="a(", teacher="b")
    twice = distill.Feature(student="Dense_0", teacher="Dense_0")
    with pytest.raises(ValueError, match="unique"):
        distill.combine(CE, teacher, student=student, alpha=0.5, temperature=1.0, features=(twice, twice))


def test_cnn_attention_feature_on_conv_maps():
    cnn_s, cnn_t = jb.models.CNN(features=(4,), hidden=8), jb.models.CNN(features=(6, 5), hidden=8)
    x = jnp.asarray(np.random.default_rng(1).random((3, 8, 8, 1)), jnp.float32)
    ps, pt = cnn_s.init(jax.random.key(0), x)["params"], cnn_t.init(jax.random.key(1), x)["params"]
    capture_t = jb.intercept.capture(lambda x: cnn_t.apply({"params": pt}, x), "Conv_1")
    fmap_t = capture_t(x)[1]["Conv_1"].outputs
    fmap_s = nn.Conv(4, (3, 3)).apply({"params": ps["Conv_0"]}, x)
    loss_fn = distill.combine(CE, lambda x: cnn_t.apply({"params": pt}, x),
                              student=lambda p, x: cnn_s.apply({"params": p}, x), alpha=0.5, temperature=2.0,
                              features=(distill.Feature(student="Conv_0", teacher="Conv_1",
                                                        kind=distill.FeatureLoss.ATTENTION),))
    _, aux = jax.jit(loss_fn)(ps, (x, jnp.arange(3)))
    ref = ((np_attention(np.asarray(fmap_s, np.float64)) - np_attention(np.asarray(fmap_t, np.float64))) ** 2).mean()
    np.testing.assert_allclose(float(aux["feature/Conv_0->Conv_1"]), ref, rtol=1e-4)


def test_one_jitted_step_distils_a_pruned_fake_quantized_student():
    spec = jb.quant.QuantSpec(bits=4)
    quantized = lambda p, x: student(jb.quant.fake_quant_params(p, spec), x)
    loss_fn = distill.combine(CE, teacher, student=quantized, alpha=0.5, temperature=2.0)
    tx = jb.sparsity.prune(optax.adam(1e-2), sparsity=0.5, update_every=1000)
    step = jb.train.make_step(loss_fn, tx, donate=False)
    state, first = step(jb.train.TrainState.create(S_PARAMS, tx), (X, Y))
    s = np.asarray(student(jb.quant.fake_quant_params(S_PARAMS, spec), X), np.float64)
    np.testing.assert_allclose(float(first["kd"]), np_kd(s, np.asarray(teacher(X), np.float64), 2.0), rtol=1e-4)
    for _ in range(30):
        state, metrics = step(state, (X, Y))
    assert float(metrics["loss"]) < 0.7 * float(first["loss"])
    kernels = [x for x, keep in zip(jax.tree.leaves(state.params), jax.tree.leaves(jb.tree.select(state.params))) if keep]
    assert kernels and all(int((k == 0).sum()) == k.size // 2 for k in kernels)  # exactly half pruned
