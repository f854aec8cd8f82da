"""Contract tests over every optax wrapper of the library: one factory per wrapper, the same checks.

Each wrapper ``W(inner)`` must compose like any optax transform: inside ``optax.chain``, inside
``optax.MultiSteps`` and ``optax.apply_if_finite``, under ``optax.inject_hyperparams``, pass extra
arguments through to ``inner``, and run 50 jitted steps without retracing. A public function of the
library annotated to return a ``GradientTransformation`` without a factory here fails
``test_every_wrapper_has_a_factory``.

``inject_hyperparams`` is applied *around* the wrapper (``inject_hyperparams(lambda learning_rate:
W(optax.sgd(learning_rate)))``): that is how a user anneals the learning rate of a pruned or LoRA
model, and it is the demanding direction (the wrapper is rebuilt at every update with traced
hyperparameters). The other direction (``W(inject_hyperparams(optax.sgd)(...))``) treats the inner
state as opaque and is covered by the chain test.
"""

import importlib
import inspect
import pkgutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb

for _m in pkgutil.walk_packages(jb.__path__, "jaxopt_big."):
    importlib.import_module(_m.name)


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"Dense_0": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros(8)},
            "Dense_1": {"kernel": jax.random.normal(k2, (8, 4)), "bias": jnp.zeros(4)}}


def _lora_params():
    return jb.lowrank.lora_init(_params(), jax.random.key(3), rank=2, alpha=2.0)


KEY = jax.random.key(1)
LR = 0.01
# name -> (the library function, wrap(inner) -> transform, params)
WRAPPERS = {
    "prune": (jb.sparsity.prune, lambda tx: jb.sparsity.prune(tx, sparsity=jb.sparsity.polynomial_schedule(
        final_sparsity=0.75, begin_step=0, end_step=40), update_every=5), _params),
    "set_": (jb.sparsity.set_, lambda tx: jb.sparsity.set_(tx, sparsity=0.5, key=KEY, update_every=5, end_step=40),
             _params),
    "rigl": (jb.sparsity.rigl, lambda tx: jb.sparsity.rigl(tx, sparsity=0.5, key=KEY, update_every=5, end_step=40),
             _params),
    "lora_trainable": (jb.lowrank.lora_trainable, jb.lowrank.lora_trainable, _lora_params),
}
NAMES = sorted(WRAPPERS)


def _loss(params, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return jnp.mean((h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]) ** 2)


X = jax.random.normal(jax.random.key(2), (32, 16))


def _grads(params, i):
    return jax.grad(lambda p: _loss(jb.leaves.densify(p), X[i % 4 * 8:(i % 4 + 1) * 8]))(params)


def _run(tx, params, steps, bad=()):
    """``steps`` jitted updates; the gradients of the steps in ``bad`` are NaN."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    for i in range(steps):
        g = _grads(params, i)
        if i in bad:
            g = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), g)
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _returns_a_transform(fn):
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return "GradientTransformation" in str(annotation)


def test_every_wrapper_has_a_factory():
    public = set()
    for module in pkgutil.walk_packages(jb.__path__, "jaxopt_big."):
        mod = importlib.import_module(module.name)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if inspect.isfunction(obj) and _returns_a_transform(obj):
                public.add(obj)
    assert public == {fn for fn, _, _ in WRAPPERS.values()}


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain_equals_alone(name):
    _, wrap, make = WRAPPERS[name]
    alone, _ = _run(wrap(optax.sgd(LR)), make(), 12)
    chained, _ = _run(optax.chain(optax.identity(), wrap(optax.sgd(LR)), optax.identity()), make(), 12)
    chex.assert_trees_all_close(chained, alone, rtol=1e-6, atol=1e-7)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), jb.leaves.densify(alone), jb.leaves.densify(make()))
    assert any(jax.tree.leaves(moved))


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_accumulates_then_steps_like_one_update(name):
    _, wrap, make = WRAPPERS[name]
    k = 3
    multi = optax.MultiSteps(wrap(optax.sgd(LR)), every_k_schedule=k)
    update = jax.jit(multi.update)
    params, state = make(), multi.init(make())
    one, one_state = make(), wrap(optax.sgd(LR)).init(make())
    one_update = jax.jit(wrap(optax.sgd(LR)).update)
    for step in range(4):
        before = params
        for micro in range(k):  # params stay put between micro-steps, so the mean gradient is this one
            updates, state = update(_grads(params, step), state, params)
            params = optax.apply_updates(params, updates)
            if micro < k - 1:
                chex.assert_trees_all_equal(params, before)
        updates, one_state = one_update(_grads(one, step), one_state, one)
        one = optax.apply_updates(one, updates)
        chex.assert_trees_all_close(params, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_a_nan_step_and_keeps_the_wrapper_state(name):
    _, wrap, make = WRAPPERS[name]
    guarded = optax.apply_if_finite(wrap(optax.sgd(LR)), max_consecutive_errors=3)
    params, state = _run(guarded, make(), 9, bad={4})
    assert int(state.total_notfinite) == 1
    # the NaN step changed nothing: the same as 8 finite steps whose gradients skip index 4
    update = jax.jit(wrap(optax.sgd(LR)).update)
    ref, ref_state = make(), wrap(optax.sgd(LR)).init(make())
    for i in (0, 1, 2, 3, 5, 6, 7, 8):
        updates, ref_state = update(_grads(ref, i), ref_state, ref)
        ref = optax.apply_updates(ref, updates)
    chex.assert_trees_all_close(params, ref, rtol=1e-6, atol=1e-7)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(jb.leaves.densify(params)))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_around_the_wrapper(name):
    _, wrap, make = WRAPPERS[name]
    tx = optax.inject_hyperparams(lambda learning_rate: wrap(optax.sgd(learning_rate)))(learning_rate=LR)
    params, state = _run(tx, make(), 6)
    ref, _ = _run(wrap(optax.sgd(LR)), make(), 6)
    chex.assert_trees_all_close(params, ref, rtol=1e-6, atol=1e-7)
    # changing the injected rate in the state scales the next step as a new sgd(LR / 10) would
    g = _grads(params, 6)
    updates, _ = jax.jit(tx.update)(g, optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(LR / 10)), params)
    full, _ = jax.jit(tx.update)(g, state, params)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda u: 0.1 * u, full), rtol=1e-5, atol=1e-9)


def _scaled_sgd(lr):
    """An inner transform that needs an extra argument: sgd whose step is multiplied by ``scale``."""
    def update(grads, state, params=None, *, scale, **extra):
        return jax.tree.map(lambda g: -lr * scale * g, grads), state
    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_reach_the_inner_transform(name):
    _, wrap, make = WRAPPERS[name]
    tx = wrap(_scaled_sgd(LR))
    params = make()
    updates, state = tx.update(_grads(params, 0), tx.init(params), params, scale=1.0)
    params = optax.apply_updates(params, updates)  # pruned weights are zero now: the next update is linear
    g = _grads(params, 1)
    once, _ = tx.update(g, state, params, scale=1.0)
    twice, _ = tx.update(g, state, params, scale=2.0)
    chex.assert_trees_all_close(twice, jax.tree.map(lambda u: 2 * u, once), rtol=1e-6, atol=1e-8)
    assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(once))


@pytest.mark.parametrize("name", NAMES)
def test_fifty_steps_do_not_retrace(name):
    _, wrap, make = WRAPPERS[name]
    tx = optax.chain(optax.clip_by_global_norm(1.0), wrap(optax.adam(1e-2)))
    chex.clear_trace_counter()  # chex counts traces per function code: one count per parametrized case

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, x):
        grads = jax.grad(lambda p: _loss(jb.leaves.densify(p), x))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = make()
    state = tx.init(params)
    for i in range(50):
        params, state = step(params, state, X[i % 4 * 8:(i % 4 + 1) * 8])
    loss = _loss(jb.leaves.densify(params), X)
    assert np.isfinite(float(loss)) and float(loss) < float(_loss(jb.leaves.densify(make()), X))
