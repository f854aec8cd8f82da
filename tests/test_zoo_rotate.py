"""Hadamard matrices and transform; QuaRot-style rotation of a Llama: same logits, better quantized with outliers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big.quant import PER_CHANNEL, PER_TOKEN, QuantSpec


def _np_sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 64])
def test_power_of_two_hadamard_equals_sylvester_and_the_fast_transform_equals_the_matmul(n):
    np.testing.assert_allclose(jb.quant.hadamard(n), _np_sylvester(n), atol=1e-7)
    x = np.random.default_rng(n).normal(size=(3, 5, n))
    got = jax.jit(jb.quant.hadamard_transform)(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, x @ _np_sylvester(n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [12, 20, 28, 24, 76, 96, 140])
def test_paley_sizes_are_orthogonal_sign_matrices_and_the_transform_matches(n):
    h = np.asarray(jb.quant.hadamard(n), np.float64) * np.sqrt(n)
    assert set(np.unique(np.round(h, 5))) == {-1.0, 1.0}
    np.testing.assert_allclose(h @ h.T, n * np.eye(n), atol=1e-4)
    x = np.random.default_rng(n).normal(size=(4, n))
    np.testing.assert_allclose(jb.quant.hadamard_transform(jnp.asarray(x, jnp.float32)), x @ h / np.sqrt(n),
                               rtol=1e-5, atol=1e-5)


def test_unsupported_hadamard_size_names_the_size():
    with pytest.raises(ValueError, match="no Hadamard matrix of order 50"):
        jb.quant.hadamard(50)
    with pytest.raises(ValueError, match="mlp/act last axis: no Hadamard matrix of order 10"):
        jb.quant.hadamard_transform(jnp.ones((2, 10)), path="mlp/act")


def _config(**kw):
    base = dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    return jb.zoo.LlamaConfig(**{**base, **kw})


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _with_random_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.RMSNorm):
            node.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, node.scale.get_value().shape), jnp.float32))
    return model


@pytest.mark.parametrize("tie,bias,scan,intermediate,key", [
    (False, False, False, 128, None),
    (True, True, True, 96, 1),   # tied, Qwen2 biases, stacked layers, 96 = 8 * 12 (Paley) online Hadamard
])
def test_rotated_llama_has_the_same_logits(tie, bias, scan, intermediate, key):
    config = _config(tie_embeddings=tie, attention_bias=bias, intermediate_size=intermediate)
    model = _with_random_norms(jb.zoo.Llama(config, rngs=nnx.Rngs(0), scan_layers=scan))
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, config.vocab_size)
    want = _forward(model, ids)
    rotated = jb.zoo.rotate(model, key=None if key is None else jax.random.key(key))
    got = _forward(rotated, ids)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) <= 1e-4
    layer = rotated.layers if scan else rotated.layers[0]
    assert layer.mlp.online_hadamard
    np.testing.assert_array_equal(layer.input_layernorm.scale.get_value(), 1.0)
    np.testing.assert_array_equal(rotated.norm.scale.get_value(), 1.0)
    assert rotated.lm_head is not None and not rotated.config.tie_embeddings
    # the residual stream really is rotated, and the original model is untouched
    assert not np.allclose(rotated.embed_tokens.embedding.get_value(), model.embed_tokens.embedding.get_value())
    np.testing.assert_array_equal(_forward(model, ids), want)
    assert model.lm_head is None if tie else model.lm_head is not None


def _outlier_llama():
    """Heavy-tailed weights (Student t, 4 degrees of freedom) and three residual channels 20x larger."""
    model = jb.zoo.Llama(_config(vocab_size=128, num_layers=1), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            t = rng.standard_t(4, node.kernel.get_value().shape)
            node.kernel.set_value(jnp.asarray(t / t.std() / np.sqrt(t.shape[0]), jnp.float32))
    e = np.array(model.embed_tokens.embedding.get_value())
    e[:, [3, 17, 40]] *= 20.0
    model.embed_tokens.embedding.set_value(jnp.asarray(e))
    return model


def test_rotation_makes_int3_and_w4a8_closer_to_float_with_planted_outliers():
    model = _outlier_llama()
    rotated = jb.zoo.rotate(model, key=jax.random.key(1))
    ids = jax.random.randint(jax.random.key(5), (4, 16), 0, 128)
    want = _forward(model, ids)

    def logit_error(m, weights, activations=None):
        out = jax.jit(jb.quant.qat(m, weights=weights, activations=activations))(ids)
        return float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))

    int3 = QuantSpec(bits=3, granularity=PER_CHANNEL)
    int4, int8_tokens = QuantSpec(bits=4, granularity=PER_CHANNEL), QuantSpec(bits=8, granularity=PER_TOKEN)
    plain, turned = logit_error(model, int3), logit_error(rotated, int3)
    assert turned < 0.9 * plain, (turned, plain)
    plain, turned = logit_error(model, int4, int8_tokens), logit_error(rotated, int4, int8_tokens)
    assert turned < 0.8 * plain, (turned, plain)


def test_rotate_rejects_bad_input():
    model = jb.zoo.Llama(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rotation is not orthogonal \(max \|Q Q\^T - I\| = 3 > 1e-4"):
        jb.zoo.rotate(model, rotation=2 * jnp.eye(64))
    with pytest.raises(ValueError, match=r"rotation has shape \(32, 32\), expected .* \(64, 64\)"):
        jb.zoo.rotate(model, rotation=jnp.eye(32))
    with pytest.raises(ValueError, match="intermediate_size=50 .* pass online_hadamard=False"):
        jb.zoo.rotate(jb.zoo.Llama(_config(intermediate_size=50), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="already runs an online Hadamard"):
        jb.zoo.rotate(jb.zoo.rotate(model))
    with pytest.raises(TypeError, match="rotate expects a jaxopt_big.zoo.Llama, got dict"):
        jb.zoo.rotate({})
    # an arbitrary orthogonal matrix also rotates (hidden sizes without a Hadamard matrix)
    q = jax.random.orthogonal(jax.random.key(0), 64)
    ids = jnp.arange(8).reshape(1, 8)
    rotated = jb.zoo.rotate(model, rotation=q, online_hadamard=False)
    assert not rotated.layers[0].mlp.online_hadamard
    want = _forward(model, ids)
    assert float(jnp.abs(_forward(rotated, ids) - want).max() / jnp.abs(want).max()) <= 1e-4


@pytest.mark.parametrize("online", [True, False])
def test_a_rotated_model_saved_and_loaded_computes_what_the_rotated_model_computes(tmp_path, online):
    import json

    config = _config(tie_embeddings=True)
    model = _with_random_norms(jb.zoo.Llama(config, rngs=nnx.Rngs(0)))
    rotated = jb.zoo.rotate(model, key=jax.random.key(2), online_hadamard=online)
    jb.zoo.save_llama(tmp_path, rotated)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    assert saved.get("jaxopt_big_online_hadamard", False) is online  # absent for a plain Llama
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, config.vocab_size)
    want = np.asarray(_forward(rotated, ids))
    for scan in (False, True):
        loaded = jb.zoo.load_llama(tmp_path, scan_layers=scan)
        np.testing.assert_allclose(_forward(loaded, ids), want, rtol=1e-5, atol=1e-5)
    if online:  # what the flag buys: the same weights without the online Hadamard compute something else
        (tmp_path / "config.json").write_text(json.dumps({**saved, "jaxopt_big_online_hadamard": False}))
        assert np.abs(np.asarray(_forward(jb.zoo.load_llama(tmp_path), ids)) - want).max() > 1e-2
