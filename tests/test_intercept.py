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
    with pytest.raises(ValueError, match="invalid module-path regex"):
        jb.intercept.capture(model.apply, "(")


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


def test_a_scanned_stack_is_named_not_run_as_if_unselected():
    # nnx.scan rebuilds the stacked layers from a split state: hooks on the model's modules never see
    # them, so capture reported only the head and qat left every block in float
    config = jb.zoo.LlamaConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                intermediate_size=32)
    ids = jnp.zeros((1, 4), jnp.int32)
    scanned = jb.zoo.Llama(config, rngs=nnx.Rngs(0), scan_layers=True)
    for run in (lambda: jb.intercept.capture(scanned)(ids),
                lambda: jb.quant.qat(scanned, weights=jb.quant.QuantSpec(bits=4))(ids)):
        with pytest.raises(ValueError, match=r"selected Linear layer ran as a copy .*unrolled \(scan_layers=False\)"):
            run()
    _, seen = jb.intercept.capture(scanned, "lm_head")(ids)  # layers outside the stack are still followed
    assert list(seen) == ["lm_head"]
    unrolled = jb.zoo.Llama(config, rngs=nnx.Rngs(0))
    assert len(jb.intercept.capture(unrolled)(ids)[1]) == 2 * 7 + 1
