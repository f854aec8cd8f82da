"""LoRA adapters: init, factored forward, merge/unmerge round trip, frozen base under optax, QLoRA."""

import contextlib
import dataclasses

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
from jaxopt_big import lowrank


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _setup(rank=2, alpha=4.0):
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
    params = _Net().init(jax.random.key(0), x)["params"]
    return x, params, lowrank.lora_init(params, jax.random.key(2), rank=rank, alpha=alpha)


def _random_b(tree, key):
    """Adapters with nonzero b, as after training."""
    def fill(path, leaf):
        if not isinstance(leaf, lowrank.LoRA):
            return leaf
        return leaf.replace(b=jax.random.normal(jax.random.fold_in(key, len(path)), leaf.b.shape))
    return jb.tree.map_with_path(fill, tree)


def test_init_shapes_scale_and_identity_at_start():
    x, params, lora = _setup(rank=2, alpha=4.0)
    conv = lora["Conv_0"]["kernel"]
    assert conv.a.shape == (3, 3, 3, 2) and conv.b.shape == (2, 6) and conv.scale == 2.0
    assert not np.any(conv.b) and np.all(np.abs(conv.a) <= 1 / np.sqrt(27))
    assert conv.base is params["Conv_0"]["kernel"] and lora["Conv_0"]["bias"] is params["Conv_0"]["bias"]
    np.testing.assert_array_equal(lowrank.apply(_Net().apply)({"params": lora}, x),
                                  _Net().apply({"params": params}, x))


def test_forward_with_adapters_equals_merged_forward_linen_and_nnx():
    x, _, lora = _setup()
    lora = _random_b(lora, jax.random.key(3))
    run = jax.jit(lowrank.apply(_Net().apply))
    expected = _Net().apply({"params": lowrank.lora_merge(lora)}, x)
    delta = expected - _Net().apply({"params": jb.tree.map_with_path(
        lambda p, l: l.base if isinstance(l, lowrank.LoRA) else l, lora)}, x)
    assert float(jnp.abs(delta).max()) > 0.1  # the adapters really change the output
    np.testing.assert_allclose(run({"params": lora}, x), expected, atol=1e-5, rtol=1e-5)

    model = jb.models.NnxMLP(12, features=(16,), rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(4), (5, 12))
    state = _random_b(lowrank.lora_init(nnx.state(model, nnx.Param), jax.random.key(5), rank=3, alpha=3.0),
                      jax.random.key(6))
    nnx.update(model, lowrank.lora_merge(state))
    merged_out = model(xs)
    nnx.update(model, state)
    np.testing.assert_allclose(lowrank.apply(model)(xs), merged_out, atol=1e-5, rtol=1e-5)


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(seed=st.integers(0, 10_000), m=st.integers(1, 12), n=st.integers(1, 12),
                  scale=st.floats(1e-3, 1e3))
def test_merge_then_unmerge_restores_the_base_within_one_ulp_of_the_merge(seed, m, n, scale):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    rank = min(m, n)
    leaf = lowrank.LoRA(base=jax.random.normal(k1, (m, n)), a=jax.random.normal(k2, (m, rank)),
                        b=jax.random.normal(k3, (rank, n)), scale=scale)
    tree = {"layer": {"kernel": leaf, "bias": jnp.ones(n)}}
    merged = lowrank.lora_merge(tree)
    back = lowrank.lora_unmerge(merged, lowrank.lora_partition(tree)[0])
    base, restored = np.asarray(leaf.base), np.asarray(back["layer"]["kernel"].base)
    ulp = np.spacing(np.maximum(np.abs(base), np.abs(np.asarray(merged["layer"]["kernel"]))))
    assert np.all(np.abs(restored - base) <= ulp)
    assert back["layer"]["kernel"].scale == scale and back["layer"]["bias"] is merged["layer"]["bias"]


def test_merge_unmerge_of_a_small_update_is_bitwise():
    _, params, lora = _setup()
    lora = jb.tree.map_with_path(lambda p, l: l.replace(b=1e-3 * jnp.ones_like(l.b))
                                 if isinstance(l, lowrank.LoRA) else l, lora)
    back = lowrank.lora_unmerge(lowrank.lora_merge(lora), lora)
    for name in ("Conv_0", "Dense_0"):
        restored, base = np.asarray(back[name]["kernel"].base), np.asarray(params[name]["kernel"])
        assert np.mean(restored.view(np.uint32) == base.view(np.uint32)) > 0.9
        assert np.all(np.abs(restored - base) <= np.spacing(np.abs(base)))


def test_training_updates_only_adapters_and_keeps_base_bitwise():
    x, params, lora = _setup()
    y = jnp.arange(8) % 4
    tx = lowrank.lora_trainable(optax.adam(1e-2))
    state = jb.train.TrainState.create(lora, tx)
    trained = sum(l.a.size + l.b.size for l in jax.tree.leaves(lora, is_leaf=lambda l: isinstance(l, lowrank.LoRA))
                  if isinstance(l, lowrank.LoRA))
    # adam keeps mu and nu for the adapter factors only (+ one step count)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * trained + 1
    step = jb.train.make_step(jb.train.classifier_loss(
        lambda p, x: lowrank.apply(_Net().apply)({"params": p}, x)), tx, donate=False)
    losses = []
    for _ in range(15):
        state, metrics = step(state, (x, y))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    before, after = jax.tree.leaves(params), jax.tree.leaves(jb.tree.map_with_path(
        lambda p, l: l.base if isinstance(l, lowrank.LoRA) else l, state.params))
    for b, a in zip(before, after):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    assert np.any(state.params["Dense_0"]["kernel"].b)


def test_qlora_adapters_train_over_a_quantized_base():
    x, params, _ = _setup()
    y = jnp.arange(8) % 4
    spec = jb.quant.QuantSpec(bits=4)
    qparams = jb.tree.map_selected(lambda p, w: jb.quant.quantize(w, spec), params)
    lora = lowrank.lora_init(qparams, jax.random.key(2), rank=2, alpha=4.0)
    kernel = lora["Dense_0"]["kernel"]
    assert isinstance(kernel.base, jb.quant.QArray) and kernel.kind.startswith("lora r=2 + ")
    assert kernel.base.nbytes < params["Dense_0"]["kernel"].nbytes / 4
    assert kernel.nbytes == kernel.base.nbytes + kernel.a.nbytes + kernel.b.nbytes
    adapters, frozen = lowrank.lora_partition(lora)
    forward = lowrank.apply(_Net().apply)
    loss_fn = jb.train.classifier_loss(lambda a, x: forward({"params": lowrank.lora_combine(a, frozen)}, x))
    tx = optax.adam(1e-2)
    step = jb.train.make_step(loss_fn, tx, donate=False)
    state = jb.train.TrainState.create(adapters, tx)
    first, _ = loss_fn(adapters, (x, y))
    for _ in range(15):
        state, _ = step(state, (x, y))
    final = lowrank.lora_combine(state.params, frozen)
    assert float(loss_fn(state.params, (x, y))[0]) < float(first)
    assert final["Dense_0"]["kernel"].base.values is frozen["Dense_0"]["kernel"].base.values
    expected = _Net().apply({"params": lowrank.lora_merge(final)}, x)
    np.testing.assert_allclose(forward({"params": final}, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank, where, match", [
    (0, jb.tree.KERNELS, r"rank must be an int >= 1, got 0"),
    (4, jb.tree.KERNELS, r"Dense_0/kernel: rank=4 exceeds min\(m, n\)=3"),
    (1, ".*/bias", r"Dense_0/bias: LoRA needs a kernel with ndim >= 2, got shape \(3,\)"),
])
def test_bad_lora_input_names_path_and_value(rank, where, match):
    params = {"Dense_0": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}}
    with pytest.raises(ValueError, match=match):
        lowrank.lora_init(params, jax.random.key(0), rank=rank, alpha=1.0, where=where)


def test_unmerge_checks_shapes():
    leaf = lowrank.LoRA(base=jnp.ones((4, 3)), a=jnp.ones((4, 1)), b=jnp.ones((1, 3)), scale=1.0)
    with pytest.raises(ValueError, match=r"k: merged kernel has shape \(3, 4\)"):
        lowrank.lora_unmerge({"k": jnp.ones((3, 4))}, {"k": leaf})


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_lora_over_a_non_float_kernel_is_refused_naming_the_path(dtype):
    params = {"Dense_0": {"kernel": jnp.ones((5, 3), dtype)}}  # a merged float update would be cast away
    match = rf"Dense_0/kernel: LoRA adapts float kernels, got dtype {jnp.dtype(dtype).name}"
    with pytest.raises(TypeError, match=match):
        lowrank.lora_init(params, jax.random.key(0), rank=1, alpha=1.0)
    quantized = {"Dense_0": {"kernel": jb.quant.quantize(jnp.ones((5, 3)), jb.quant.QuantSpec(bits=8))}}
    lora = lowrank.lora_init(quantized, jax.random.key(0), rank=1, alpha=1.0)["Dense_0"]["kernel"]
    assert lora.a.dtype == jnp.float32 and lora.dense().dtype == jnp.float32


@pytest.mark.parametrize("with_mesh", [False, True])
def test_lora_on_explicit_sharding_equals_unsharded(explicit_mesh, with_mesh):
    w = jax.random.normal(jax.random.key(6), (8, 16))
    params = {"d": {"kernel": jax.device_put(w, jax.NamedSharding(explicit_mesh, jax.P("data", "model")))}}
    want = jb.lowrank.lora_init({"d": {"kernel": w}}, jax.random.key(7), rank=2, alpha=4.0)["d"]["kernel"]
    want = dataclasses.replace(want, b=jnp.ones_like(want.b))
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        got = jb.lowrank.lora_init(params, jax.random.key(7), rank=2, alpha=4.0)["d"]["kernel"]
        got = dataclasses.replace(got, b=jnp.ones_like(got.b))  # a non-zero update: a @ b contracts
        dense = got.dense()
    np.testing.assert_array_equal(got.a, want.a)
    np.testing.assert_allclose(dense, want.dense(), atol=1e-6)
    assert (got.a.sharding.spec, got.b.sharding.spec) == (jax.P("data", None), jax.P(None, "model"))
