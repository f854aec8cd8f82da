"""Meshes, sharding rules, pmap and pipeline against single-device references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big.tree import Rule

MODEL = jb.models.MLP(features=(32, 32), num_classes=8)
X = np.asarray(jax.random.normal(jax.random.key(1), (5, 16, 12)), np.float32)
Y = np.asarray(jax.random.randint(jax.random.key(2), (5, 16), 0, 8), np.int32)
# Momentum SGD: linear in the gradient, so a constant gradient-scale bug (psum for pmean, 8x) shows in
# full; Adam would almost cancel it.
TX = optax.sgd(0.1, momentum=0.9)
LOSS = jb.train.classifier_loss(lambda p, x: MODEL.apply({"params": p}, x))
TENSOR_RULES = [Rule("Dense_0/kernel", jax.P(None, "tensor")), Rule("Dense_0/bias", jax.P("tensor")),
                Rule("Dense_1/kernel", jax.P("tensor", None))]


def _params():
    return MODEL.init(jax.random.key(0), X[0])["params"]


def _run(step, state, n=5):
    losses = []
    for i in range(n):
        state, m = step(state, (X[i], Y[i]))
        losses.append(float(m["loss"]))
    return state, losses


def _reference():
    return _run(jb.train.make_step(LOSS, TX, donate=False), jb.train.TrainState.create(_params(), TX))


@pytest.mark.parametrize("shape,rules", [(dict(data=8), []), (dict(data=4, fsdp=2), []),
                                         (dict(data=2, tensor=4), TENSOR_RULES)])
def test_mesh_steps_equal_single_device(shape, rules):
    ref_state, ref_losses = _reference()
    mesh = jb.parallel.make_mesh(**shape)
    state = jb.parallel.shard_params(jb.train.TrainState.create(_params(), TX), mesh, rules)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    state, losses = _run(jb.train.make_step(LOSS, TX, mesh=mesh), state)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    assert jax.tree.map(lambda x: x.sharding, state) == shardings  # every leaf keeps its placement
    if "fsdp" in shape:  # FSDP default: the kernel and its momentum are split over fsdp
        assert state.params["Dense_0"]["kernel"].sharding.spec == jax.P(None, "fsdp")
        assert state.opt_state[0].trace["Dense_0"]["kernel"].sharding.spec == jax.P(None, "fsdp")
    if "tensor" in shape:
        assert state.params["Dense_1"]["kernel"].addressable_shards[0].data.shape == (8, 32)


def test_pmap_step_equals_single_device():
    ref_state, ref_losses = _reference()
    step = jb.parallel.pmap_step(LOSS, TX)
    state = jb.parallel.replicate(jb.train.TrainState.create(_params(), TX))
    losses = []
    for i in range(5):
        state, m = step(state, jb.parallel.split_batch((X[i], Y[i])))
        losses.append(float(m["loss"][0]))
    chex.assert_trees_all_close(jb.parallel.unreplicate(state.params), ref_state.params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)


def test_explicit_axes_data_parallel():
    ref_state, _ = _reference()
    mesh = jb.parallel.make_mesh(data=8, explicit=True)
    assert mesh.axis_types[0] == jax.sharding.AxisType.Explicit
    state = jb.parallel.shard_params(jb.train.TrainState.create(_params(), TX), mesh)
    state, _ = _run(jb.train.make_step(LOSS, TX, mesh=mesh), state)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=1e-5, rtol=1e-5)


def test_pipeline_four_stages_value_and_gradient():
    mesh = jax.make_mesh((4, 2), ("stage", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    w = jax.random.normal(k1, (4, 8, 8)) / 3
    b = jax.random.normal(k2, (4, 8))
    x = jax.random.normal(k3, (12, 8))
    stage = lambda p, h: jnp.tanh(h @ p["w"] + p["b"])

    def sequential(params, x):
        for s in range(4):
            x = stage(jax.tree.map(lambda a: a[s], params), x)
        return x

    params = {"w": w, "b": b}
    loss = lambda f: lambda p, x: (f(p, x) ** 2 * jnp.arange(8)).sum()
    piped = lambda p, x: jb.parallel.pipeline(stage, p, x, mesh=mesh, microbatches=3)
    np.testing.assert_allclose(piped(params, x), sequential(params, x), atol=1e-6)
    g_pipe = jax.jit(jax.grad(loss(piped), argnums=(0, 1)))(params, x)
    g_seq = jax.grad(loss(sequential), argnums=(0, 1))(params, x)
    chex.assert_trees_all_close(g_pipe, g_seq, atol=1e-5)


def test_shard_params_rules_first_match_and_fsdp_default():
    mesh = jb.parallel.make_mesh(data=2, fsdp=2, tensor=2)
    params = {"a": {"kernel": jnp.zeros((6, 4))}, "b": {"kernel": jnp.zeros((3, 5))}, "c": {"kernel": jnp.zeros((4, 8))}}
    sh = jb.parallel.param_shardings(params, mesh, [Rule("a/.*", jax.P(None, "tensor")), Rule(".*kernel", jax.P())])
    assert sh["a"]["kernel"].spec == jax.P(None, "tensor")  # first rule wins over the second
    assert sh["c"]["kernel"].spec == jax.P()
    default = jb.parallel.param_shardings(params, mesh)
    assert default["a"]["kernel"].spec == jax.P("fsdp")       # largest divisible dim: 6
    assert default["b"]["kernel"].spec == jax.P()             # nothing divisible by 2
    assert default["c"]["kernel"].spec == jax.P(None, "fsdp")


def test_training_memory_estimate_under_fsdp():
    params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(128)}
    single = jb.report.training_memory(params, optax.adam(1e-3))
    assert (single.params, single.opt_state) == (4 * (64 * 128 + 128), 2 * 4 * (64 * 128 + 128) + 4)
    mesh = jb.parallel.make_mesh(data=2, fsdp=4)
    sharded = jb.report.training_memory(jb.parallel.shard_params(params, mesh), optax.adam(1e-3))
    assert sharded.params == 4 * (64 * 128 + 128) // 4
    assert sharded.opt_state == 2 * sharded.params + 4
    assert sharded.total == 4 * sharded.params + 4


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="has 12 devices, but 8"):
        jb.parallel.make_mesh(data=3, fsdp=4)
    with pytest.raises(ValueError, match="not divisible"):
        jb.parallel.make_mesh(data=-1, fsdp=3)
    mesh = jb.parallel.make_mesh(data=8)
    with pytest.raises(ValueError, match=r"names mesh axes \['model'\]"):
        jb.parallel.shard_params(_params(), mesh, [Rule("Dense_0/kernel", jax.P(None, "model"))])
    with pytest.raises(ValueError, match="matches no leaf"):
        jb.parallel.shard_params(_params(), mesh, [Rule("Dense_9/kernel", jax.P())])
    with pytest.raises(ValueError, match=r"Dense_0/kernel: dimension 0 of shape \(12, 32\)"):
        jb.parallel.shard_params(_params(), mesh, [Rule("Dense_0/kernel", jax.P("data"))])
    step = jb.train.make_step(LOSS, TX, mesh=mesh)
    with pytest.raises(ValueError, match="leading size 12 is not divisible .* size 8"):
        step(jb.train.TrainState.create(_params(), TX), (X[0][:12], Y[0][:12]))
    with pytest.raises(ValueError, match="must equal the 4 stages"):
        jb.parallel.pipeline(lambda p, h: h, jnp.zeros((3, 2)), jnp.zeros((4, 2)),
                             mesh=jax.make_mesh((4, 2), ("stage", "data")), microbatches=2)


def test_quantize_transform_keeps_every_leaf_sharding():
    def snap(updates, state, params=None, **extra):  # weights stay on an int8 grid after the update
        new = jb.quant.fake_quant_params(optax.apply_updates(params, updates), jb.quant.QuantSpec(bits=8))
        return jax.tree.map(lambda n, p: n - p, new, params), state

    tx = optax.chain(optax.adam(1e-2), optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), snap))
    mesh = jb.parallel.make_mesh(data=2, fsdp=2, tensor=2)
    state = jb.parallel.shard_params(jb.train.TrainState.create(_params(), tx), mesh, TENSOR_RULES)
    before = jax.tree.map(lambda x: x.sharding, state)
    state, _ = _run(jb.train.make_step(LOSS, tx, mesh=mesh), state, n=2)
    assert jax.tree.map(lambda x: x.sharding, state) == before
    kernel = np.asarray(state.params["Dense_1"]["kernel"])
    assert len(np.unique(kernel)) <= 255  # really quantized


def test_explicit_axes_fsdp():
    ref_state, _ = _reference()
    mesh = jb.parallel.make_mesh(data=4, fsdp=2, explicit=True)
    state = jb.parallel.shard_params(jb.train.TrainState.create(_params(), TX), mesh)
    state, _ = _run(jb.train.make_step(LOSS, TX, mesh=mesh), state)
    assert state.params["Dense_0"]["kernel"].sharding.spec == jax.P(None, "fsdp")
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(ref_state.params), atol=1e-5, rtol=1e-5)
