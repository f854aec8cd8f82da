import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxopt_big as jb
from test_leaves import Int8

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))


def _cnn():
    model = jb.models.CNN()
    variables = model.init(jax.random.key(0), X)
    return model, variables


def test_capture_linen_records_inputs_outputs_kernels_under_jit():
    model, variables = _cnn()
    out, seen = jax.jit(jb.intercept.capture(model.apply))(variables, X)
    assert list(seen) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    np.testing.assert_allclose(out, model.apply(variables, X), rtol=1e-6)
    np.testing.assert_array_equal(seen["Conv_0"].inputs, X)
    np.testing.assert_array_equal(seen["Dense_1"].outputs, out)
    np.testing.assert_array_equal(seen["Dense_0"].kernel, variables["params"]["Dense_0"]["kernel"])
    # the Dense_0 output is relu-ed into Dense_1: an independent check of the recorded values
    np.testing.assert_allclose(seen["Dense_1"].inputs, jax.nn.relu(seen["Dense_0"].outputs), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_a_failed_call_leaves_no_records_for_the_next(jit):
    model, variables = _cnn()
    wrapped = jb.intercept.capture(model.apply)
    run = jax.jit(wrapped) if jit else wrapped
    bad = {"params": {**variables["params"], "Dense_1": {**variables["params"]["Dense_1"],
                                                         "kernel": jnp.ones((3, 10))}}}
    with pytest.raises(Exception, match="Dense_1"):  # fails after Conv_0, Conv_1 and Dense_0 were recorded
        run(bad, X)
    out, seen = run(variables, X)
    assert list(seen) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    np.testing.assert_array_equal(seen["Dense_1"].outputs, out)


def test_capture_selects_by_module_path_regex():
    model, variables = _cnn()
    _, seen = jb.intercept.capture(model.apply, "Dense_.*")(variables, X)
    assert sorted(seen) == ["Dense_0", "Dense_1"]
    with pytest.raises(ValueError, match=r"^where: pattern .Dense_9. matches no leaf; available paths: \[.*Conv_0"):
        jb.intercept.capture(model.apply, "Dense_9")(variables, X)
    with pytest.raises(ValueError, match=r"^where: invalid regex '\(': "):  # jb.tree's one compiler, not re.error
        jb.intercept.capture(model.apply, "(")
    with pytest.raises(ValueError, match=r"^where: invalid regex '\[': "):
        jb.calibration.layer_order(model.apply, variables, X, where="[")


def test_capture_transformer_dense_general_and_nested_paths():
    model = jb.models.Transformer(depth=1)
    variables = model.init(jax.random.key(0), X)
    _, seen = jb.intercept.capture(model.apply, ".*attention.*|_Block_0/MultiHeadDotProductAttention_0/.*")(variables, X)
    assert {"_Block_0/MultiHeadDotProductAttention_0/query", "_Block_0/MultiHeadDotProductAttention_0/out"} <= set(seen)
    assert seen["_Block_0/MultiHeadDotProductAttention_0/query"].outputs.shape == (4, 8, 4, 16)


def test_replace_linen_runs_layer_on_substituted_values():
    model, variables = _cnn()

    def zero_dense_1(call):
        return call.run(params=jax.tree.map(jnp.zeros_like, call.params))
    out = jax.jit(jb.intercept.replace(model.apply, "Dense_1", zero_dense_1))(variables, X)
    np.testing.assert_array_equal(out, np.zeros((4, 10)))

    def halve_inputs(call):
        return call.run(inputs=call.inputs * 0.5)
    halved = jb.intercept.replace(model.apply, "Dense_1", halve_inputs)(variables, X)
    _, seen = jb.intercept.capture(model.apply, "Dense_1")(variables, X)
    p = variables["params"]["Dense_1"]
    np.testing.assert_allclose(halved, 0.5 * seen["Dense_1"].inputs @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-6)


def test_compressed_kernel_runs_on_its_dense_value_inside_interception():
    model, variables = _cnn()
    params = dict(variables["params"])
    params["Dense_0"] = {**params["Dense_0"], "kernel": Int8.of(params["Dense_0"]["kernel"])}
    out, seen = jax.jit(jb.intercept.capture(model.apply))({"params": params}, X)
    dense = jb.leaves.densify(params)
    np.testing.assert_allclose(out, model.apply({"params": dense}, X), rtol=1e-5, atol=1e-6)
    assert isinstance(seen["Dense_0"].kernel, Int8)


def test_nnx_capture_and_replace_restore_the_model():
    model = jb.models.NnxCNN(rngs=nnx.Rngs(0))
    ref = model(X)
    out, seen = jb.intercept.capture(model)(X)
    assert list(seen) == ["convs/0", "convs/1", "hidden", "head"]
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(seen["head"].inputs @ model.head.kernel.get_value() + model.head.bias.get_value(), ref, rtol=1e-5, atol=1e-5)
    doubled = jb.intercept.replace(model, "head", lambda call: 2 * call.run())(X)
    np.testing.assert_allclose(doubled, 2 * ref, rtol=1e-6)
    assert type(model.head) is nnx.Linear  # class restored
    np.testing.assert_array_equal(model(X), ref)


def test_nnx_capture_under_nnx_jit():
    model = jb.models.NnxMLP(64, rngs=nnx.Rngs(0))
    x = X.reshape(4, -1)

    @nnx.jit
    def run(m, x):
        return jb.intercept.capture(m, "layers/1")(x)
    out, seen = run(model, x)
    assert list(seen) == ["layers/1"] and seen["layers/1"].outputs.shape == (4, 128)
    np.testing.assert_allclose(out, model(x), rtol=1e-5)


def test_repeated_layer_calls_are_numbered():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(8)
            return d(d(x))
    m = Twice()
    v = m.init(jax.random.key(0), jnp.ones((2, 8)))
    _, seen = jb.intercept.capture(m.apply)(v, jnp.ones((2, 8)))
    assert sorted(seen) == ["Dense_0", "Dense_0@1"]
    np.testing.assert_array_equal(seen["Dense_0@1"].inputs, seen["Dense_0"].outputs)


def _llama_pair():
    """An unrolled and a scanned Llama with the same weights (the scanned ones: the layers stacked)."""
    config = jb.zoo.LlamaConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                intermediate_size=32)
    unrolled = jb.zoo.Llama(config, rngs=nnx.Rngs(0))
    scanned = jb.zoo.Llama(config, rngs=nnx.Rngs(1), scan_layers=True)
    params = nnx.state(unrolled, nnx.Param)
    flat = dict(zip(jb.tree.paths(params), jax.tree.leaves(params)))
    nnx.update(scanned, jb.tree.map_with_path(
        lambda p, x: jnp.stack([flat[p.replace("layers/", f"layers/{i}/")] for i in range(2)])
        if p.startswith("layers/") else flat[p], nnx.state(scanned, nnx.Param)))
    return unrolled, scanned


def test_capture_and_qat_follow_a_scanned_stack_as_the_unrolled_model():
    # nnx rebuilds a scanned stack's layers from a split state on every step: hooks on the model's own
    # modules never saw them (capture reported only the head, qat left every block in float)
    unrolled, scanned = _llama_pair()
    ids = jax.random.randint(jax.random.key(3), (2, 4), 0, 32)
    _, want = jb.intercept.capture(unrolled)(ids)
    _, got = jax.jit(jb.intercept.capture(scanned))(ids)
    assert len(got) == len(want) == 2 * 7 + 1
    for path, rec in want.items():  # layers/i/mlp/up_proj is the stack's layers/mlp/up_proj, call i
        layer = path.split("/")[1] if path.startswith("layers/") else "0"
        mine = path.replace(f"layers/{layer}/", "layers/") + ("@1" if layer == "1" else "")
        for a, b in zip(got[mine], rec):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    spec = jb.quant.QuantSpec(bits=4, granularity=jb.quant.PER_CHANNEL)
    q_unrolled = jb.quant.qat(unrolled, weights=spec, activations=jb.quant.QuantSpec())(ids)
    q_scanned = jb.quant.qat(scanned, weights=spec, activations=jb.quant.QuantSpec())(ids)
    np.testing.assert_allclose(q_scanned, q_unrolled, atol=1e-5)
    assert np.abs(q_scanned - scanned(ids)).max() > 1e-2  # the blocks really ran quantized
    assert type(scanned.layers) is jb.zoo.DecoderLayer and type(scanned.layers.mlp.up_proj) is nnx.Linear
