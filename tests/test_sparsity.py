"""Pruning: exact counts, structures, global threshold vs sort, optax wrapper, sharding, bad input."""

import contextlib
import functools
import re

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big import sparsity as sp

SETTINGS = hypothesis.settings(max_examples=10, deadline=None)
shapes = st.sampled_from([(1, 1), (3, 7), (16, 16), (40, 25)])  # few shapes: few compilations


def _pruned(s, n):
    """The documented count of a constant sparsity: Python's round(s * n)."""
    return round(s * n)


def _tree(key, shapes_):
    keys = jax.random.split(key, len(shapes_))
    return {f"l{i}": {"kernel": jax.random.normal(k, s), "bias": jnp.ones(s[-1])}
            for i, (k, s) in enumerate(zip(keys, shapes_))}


@hypothesis.given(s=st.floats(0.0, 0.99), shape=shapes, seed=st.integers(0, 100), ties=st.booleans())
@SETTINGS
def test_layer_masks_prune_exactly_the_lowest(s, shape, seed, ties):
    w = np.asarray(jax.random.normal(jax.random.key(seed), shape))
    if ties:
        w = np.round(w)
    mask = np.asarray(sp.make_masks(sp.magnitude({"k": {"kernel": jnp.asarray(w)}}), s)["k"]["kernel"])
    k = _pruned(s, w.size)
    assert int((~mask).sum()) == k
    ref = np.ones(w.size, bool)
    ref[np.argsort(np.abs(w).ravel(), kind="stable")[:k]] = False  # ties: lower index pruned first
    np.testing.assert_array_equal(mask.ravel(), ref)


@hypothesis.given(s=st.floats(0.0, 0.99), sh=st.sampled_from([[(3, 7)], [(16, 16), (40, 25)], [(1, 1), (3, 7), (16, 16)]]), seed=st.integers(0, 50))
@SETTINGS
def test_global_masks_and_threshold_match_sort(s, sh, seed):
    params = _tree(jax.random.key(seed), sh)
    scores = sp.magnitude(params)
    masks = sp.make_masks(scores, s, scope=sp.Scope.GLOBAL)
    kernels = [np.asarray(scores[f"l{i}"]["kernel"]).ravel() for i in range(len(sh))]
    flat = np.concatenate(kernels)
    k = _pruned(s, flat.size)
    got = np.concatenate([np.asarray(masks[f"l{i}"]["kernel"]).ravel() for i in range(len(sh))])
    assert int((~got).sum()) == k
    assert all(masks[f"l{i}"]["bias"] is None for i in range(len(sh)))
    if k:
        ref_t = np.sort(flat)[k - 1]
        assert float(sp.global_threshold(scores, s)) == ref_t
        assert flat[~got].max() == ref_t and (flat[got] >= ref_t).all()


def test_threshold_with_heavy_ties_and_structured_values():
    # 2 x 90,000 scores: over SORT_BELOW, so the counting passes run
    x = jnp.concatenate([jnp.zeros(45000), jnp.full(27000, 2.0), jnp.arange(18000.0)]).reshape(300, 300)
    scores = {"a": {"kernel": x}, "b": {"kernel": -x.T}}
    flat = np.sort(np.concatenate([np.asarray(x).ravel(), -np.asarray(x).ravel()]))
    for s in (0.1, 0.3, 0.5, 0.74, 0.75, 0.9):
        assert float(sp.global_threshold(scores, s)) == flat[_pruned(s, flat.size) - 1]
        m = sp.make_masks(scores, s, scope=sp.Scope.GLOBAL)
        assert int(sum((~m[k]["kernel"]).sum() for k in "ab")) == _pruned(s, flat.size)


@pytest.mark.parametrize("counting", [False, True])
def test_cuts_at_every_tie_depth_match_a_stable_sort(counting):
    # A cut 0 to 11 ties deep. Small inputs are sorted; with a third leaf of high scores the total is
    # over SORT_BELOW and the counting passes run: unrolled minimum passes (fewer than 4 ties), else
    # the counting fallback.
    rng = np.random.default_rng(0)
    scores = {"a": {"kernel": jnp.asarray(rng.integers(0, 3, (4, 6)).astype(np.float32))},
              "b": {"kernel": jnp.asarray(rng.integers(0, 3, (3, 4)).astype(np.float32))}}
    if counting:
        scores["c"] = {"kernel": jnp.full((256, 256), 9.0)}
    total = sum(int(v["kernel"].size) for v in scores.values())
    assert (total >= sp._select.SORT_BELOW) == counting
    flat = np.concatenate([np.asarray(scores[k]["kernel"]).ravel() for k in "ab"])
    for k in range(flat.size):
        m = sp.make_masks(scores, k / total, scope=sp.Scope.GLOBAL)
        ref = np.ones(flat.size, bool)
        ref[np.argsort(flat, kind="stable")[:k]] = False  # ties: earlier leaf, then lower index, pruned first
        np.testing.assert_array_equal(np.concatenate([np.asarray(m[n]["kernel"]).ravel() for n in "ab"]), ref)
        assert not counting or bool(m["c"]["kernel"].all())


def test_nan_scores_are_pruned_first_and_counts_stay_exact():
    """Traced NaN scores (under jit nothing can be raised) are pruned first; eager ones raise."""
    w = jnp.arange(1.0, 21.0).reshape(4, 5).at[1, 2].set(jnp.nan).at[3, 4].set(jnp.nan)
    with pytest.raises(ValueError, match=r"d/kernel: scores contain NaN or Inf \(2 of 20"):
        sp.make_masks({"d": {"kernel": w}}, 0.25)
    for scope in sp.Scope:
        m = jax.jit(lambda s: sp.make_masks(s, 0.25, scope=scope))({"d": {"kernel": w}})["d"]["kernel"]
        assert int((~m).sum()) == 5
        assert not m[1, 2] and not m[3, 4]
        np.testing.assert_array_equal(np.asarray(~m).ravel().nonzero()[0], [0, 1, 2, 7, 19])


@hypothesis.given(n=st.integers(1, 4), m_=st.sampled_from([4, 8]), rows=st.sampled_from([1, 3]),
                  cols=st.sampled_from([1, 5]), seed=st.integers(0, 50))
@SETTINGS
def test_nm_masks_are_valid(n, m_, rows, cols, seed):
    hypothesis.assume(n <= m_)
    w = jax.random.normal(jax.random.key(seed), (3, rows * m_, cols))
    mask = np.asarray(sp.make_masks(sp.magnitude({"c": {"kernel": w}}), structure=sp.NM(n, m_))["c"]["kernel"])
    groups = mask.reshape(3, rows, m_, cols)
    assert (groups.sum(2) == n).all()
    a = np.abs(np.asarray(w)).reshape(3, rows, m_, cols)
    kept_min = np.where(groups, a, np.inf).min(2)
    pruned_max = np.where(groups, -np.inf, a).max(2)
    assert (kept_min >= pruned_max).all()


def test_block_and_channel_masks_prune_whole_groups_by_norm():
    w = jax.random.normal(jax.random.key(0), (8, 12))
    m = np.asarray(sp.make_masks({"d": {"kernel": w}}, 0.5, structure=sp.Tile((2, 3)))["d"]["kernel"])
    blocks = m.reshape(4, 2, 4, 3)
    assert (blocks.all(axis=(1, 3)) | ~blocks.any(axis=(1, 3))).all() and (~blocks.any(axis=(1, 3))).sum() == 8
    norms = (np.asarray(w) ** 2).reshape(4, 2, 4, 3).sum((1, 3))
    keep = blocks.all(axis=(1, 3))
    assert norms[keep].min() >= norms[~keep].max()
    c = np.asarray(sp.make_masks({"d": {"kernel": w}}, 0.25, structure=sp.Channel(-1))["d"]["kernel"])
    col_norm = np.linalg.norm(np.asarray(w), axis=0)
    dropped = ~c.all(0)
    assert dropped.sum() == 3 and (c.all(0) | ~c.any(0)).all()
    assert col_norm[dropped].max() <= col_norm[~dropped].min()


def test_erk_densities_match_the_formula():
    shapes_ = [(64, 32), (3, 3, 16, 32), (32, 10)]
    params = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), s)} for i, s in enumerate(shapes_)}
    masks = sp.make_masks(sp.magnitude(params), 0.8, distribution=sp.ERK())
    sizes = np.array([np.prod(s) for s in shapes_])
    raw = np.array([sum(s) / np.prod(s) for s in shapes_])
    eps = 0.2 * sizes.sum() / (raw * sizes).sum()  # no layer saturates at 80%
    assert (eps * raw < 1).all()
    dens = np.array([float(masks[f"l{i}"]["kernel"].mean()) for i in range(3)])
    assert (np.abs(dens - eps * raw) <= 1.0 / sizes).all(), (dens, eps * raw)
    # with high density some layers saturate at 1 and the total still hits the target
    d = np.asarray(sp.erk_densities(shapes_, 0.1))
    assert d.max() == 1.0 and abs((d * sizes).sum() / sizes.sum() - 0.9) < 1e-5


def test_schedules():
    f = sp.polynomial_schedule(final_sparsity=0.9, begin_step=10, end_step=110, update_every=10, init_sparsity=0.1)
    for t in (0, 9, 10, 15, 20, 60, 109, 110, 500):
        p = 0.0 if t < 10 else min((t - 10) // 10 * 10 / 100, 1.0)
        ref = 0.0 if t < 10 else 0.9 + (0.1 - 0.9) * (1 - p) ** 3
        assert abs(float(jax.jit(f)(t)) - ref) < 1e-6, t
    assert float(sp.constant_schedule(0.3)(7)) == pytest.approx(0.3)


def _mlp_problem():
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (16, 32)), "bias": jnp.zeros(32)},
              "Dense_1": {"kernel": jax.random.normal(jax.random.key(1), (32, 4)), "bias": jnp.zeros(4)}}
    x = jax.random.normal(jax.random.key(2), (64, 16))
    y = jax.random.normal(jax.random.key(3), (64, 4))

    def loss(p):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)
    return params, loss


def _train(tx, steps, params, loss, max_traces=1):
    @jax.jit
    @chex.assert_max_traces(n=max_traces)
    def step(params, state):
        g = jax.grad(loss)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("ste", [False, True])
def test_pruned_weights_exactly_zero_after_100_steps_without_retracing(ste):
    chex.clear_trace_counter()
    params, loss = _mlp_problem()
    sched = sp.polynomial_schedule(final_sparsity=0.8, begin_step=0, end_step=60, update_every=10)
    tx = sp.prune(optax.adam(1e-2), sparsity=sched, update_every=10, straight_through=ste)
    out, state = _train(tx, 100, params, loss)
    for layer in ("Dense_0", "Dense_1"):
        k, m = np.asarray(out[layer]["kernel"]), np.asarray(state.masks[layer]["kernel"])
        assert (k[~m] == 0).all() and int((~m).sum()) == _pruned(0.8, k.size)
        assert (np.asarray(out[layer]["bias"]) != 0).any()
    assert float(loss(out)) < float(loss(params))
    if ste:  # dense weights keep training under the mask
        assert (np.asarray(state.dense["Dense_0"]["kernel"])[~np.asarray(state.masks["Dense_0"]["kernel"])] != 0).any()


def test_prune_inner_sees_full_gradients_unless_sparse_gradients():
    params, loss = _mlp_problem()
    sched = sp.polynomial_schedule(final_sparsity=0.8, begin_step=0, end_step=60, update_every=10)
    seen = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))
    runs = {}
    for sparse in (False, True):
        chex.clear_trace_counter()
        tx = sp.prune(optax.chain(seen, optax.adam(1e-2)), sparsity=sched, update_every=10, sparse_gradients=sparse)
        runs[sparse] = _train(tx, 80, params, loss)
    with pytest.raises(TypeError, match="sparse_gradients must be a bool, got 'yes'"):
        sp.prune(optax.adam(1e-2), sparsity=0.5, sparse_gradients="yes")
    # adam is elementwise and magnitude masks never bring a pruned weight back: the same weights
    chex.assert_trees_all_close(runs[False][0], runs[True][0], rtol=1e-6, atol=1e-7)
    for sparse, (_, state) in runs.items():
        pruned = ~np.asarray(state.masks["Dense_0"]["kernel"])
        last = np.asarray(state.inner[0]["Dense_0"]["kernel"])[pruned]  # the gradient the inner chain was given
        assert (last == 0).all() if sparse else (last != 0).any()


def test_prune_composes_with_chain_multisteps_and_apply_if_finite():
    params, loss = _mlp_problem()
    k = lambda p: np.asarray(p["Dense_0"]["kernel"])
    for tx in (optax.chain(optax.clip_by_global_norm(1.0), sp.prune(optax.adam(1e-2), sparsity=0.5, update_every=5)),
               optax.MultiSteps(sp.prune(optax.adam(1e-2), sparsity=0.5, update_every=5), every_k_schedule=2),
               optax.apply_if_finite(sp.prune(optax.adam(1e-2), sparsity=0.5, update_every=5), 3)):
        chex.clear_trace_counter()
        out, state = _train(tx, 20, params, loss)
        masks = optax.tree_utils.tree_get(state, "masks")
        assert (k(out)[~np.asarray(masks["Dense_0"]["kernel"])] == 0).all()
        assert abs((k(out) == 0).mean() - 0.5) < 0.01, tx
        assert float(loss(out)) < float(loss(params))


def test_saliency_and_random_scores_prune_to_target():
    params, loss = _mlp_problem()
    for score in (sp.saliency, sp.random):
        chex.clear_trace_counter()
        tx = sp.prune(optax.sgd(1e-2), sparsity=0.6, score=score, key=jax.random.key(1), scope=sp.Scope.GLOBAL)
        out, _ = _train(tx, 3, params, loss)
        n = sum(out[l]["kernel"].size for l in ("Dense_0", "Dense_1"))
        assert sum(int((out[l]["kernel"] == 0).sum()) for l in ("Dense_0", "Dense_1")) == _pruned(0.6, n)


@pytest.mark.parametrize("grow", [sp.set_, sp.rigl])
def test_dynamic_sparsity_stays_exact_and_regrown_start_at_zero(grow):
    params, loss = _mlp_problem()
    tx = grow(optax.adam(1e-2), sparsity=0.7, key=jax.random.key(0), update_every=5, end_step=40)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    changed = False
    for t in range(30):
        old = np.asarray(state.masks["Dense_0"]["kernel"])
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
        new = np.asarray(state.masks["Dense_0"]["kernel"])
        k = np.asarray(params["Dense_0"]["kernel"])
        assert int((~new).sum()) == _pruned(0.7, new.size)
        assert (k[~new] == 0).all() and (k[new & ~old] == 0).all()
        changed |= bool((new != old).any()) and t > 0
    assert changed
    assert (np.asarray(params["Dense_0"]["kernel"]) == 0).sum() >= _pruned(0.7, 512)


def test_packed_sparse_round_trip_bytes_and_report():
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (100, 100)), "bias": jnp.ones(100)}}
    masks = sp.make_masks(sp.magnitude(params), 0.9)
    pruned = sp.apply_masks(params, masks)
    packed = sp.pack_params(pruned, masks)
    assert isinstance(packed["d"]["kernel"], sp.PackedSparse) and jb.leaves.is_compressed(packed["d"]["kernel"])
    chex.assert_trees_all_equal(jb.leaves.densify(packed), pruned)
    assert packed["d"]["kernel"].nbytes == 10000 // 8 + 1000 * 4
    assert pruned["d"]["kernel"].nbytes / packed["d"]["kernel"].nbytes >= 6
    chex.assert_trees_all_equal(jax.jit(jb.leaves.densify)(packed), pruned)
    assert "sparse 90%" in str(jb.report.summary(packed))
    assert sp.sparsity(packed)["d/kernel"] == pytest.approx(0.9)


def _mesh_params(axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    shard = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
    params = {"a": {"kernel": shard(jax.random.normal(jax.random.key(0), (256, 128)), jax.P("data", None))},
              "b": {"kernel": shard(jax.random.normal(jax.random.key(1), (128, 256)), jax.P(None, "data"))},
              "c": {"kernel": shard(jax.random.normal(jax.random.key(2), (3, 3, 16, 32)), jax.P(None, None, None, "data"))}}
    return mesh, params


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_masks_keep_parameter_sharding(axis_type):
    mesh, params = _mesh_params(axis_type)
    with jax.set_mesh(mesh):
        for kw in ({}, {"scope": sp.Scope.GLOBAL}, {"structure": sp.NM(2, 4)}, {"structure": sp.Channel(-1)},
                   {"structure": sp.Tile((4, 4))}):
            masks = jax.jit(lambda p: sp.make_masks(sp.magnitude(p), None if "structure" in kw and
                                                    isinstance(kw["structure"], sp.NM) else 0.5, **kw))(params)
            for name in params:
                m, w = masks[name]["kernel"], params[name]["kernel"]
                assert m.sharding.is_equivalent_to(w.sharding, w.ndim), (kw, name, m.sharding, w.sharding)
            n = sum(int(params[k]["kernel"].size) for k in params)
            assert sum(int((~masks[k]["kernel"]).sum()) for k in params) == n // 2
        tx = sp.prune(optax.sgd(0.1), sparsity=0.5, scope=sp.Scope.GLOBAL, update_every=1)
        state = tx.init(params)
        u, state = jax.jit(tx.update)(params, state, params)
        for name in params:
            w = params[name]["kernel"]
            assert state.masks[name]["kernel"].sharding.is_equivalent_to(w.sharding, w.ndim)
            assert u[name]["kernel"].sharding.is_equivalent_to(w.sharding, w.ndim)


def test_global_threshold_does_not_gather_sharded_leaves():
    mesh, params = _mesh_params(jax.sharding.AxisType.Auto)
    hlo = jax.jit(lambda p: sp.global_threshold(sp.magnitude(p), 0.7)).lower(params).compile().as_text()
    for line in hlo.splitlines():
        if re.search(r"= \S+ all-gather\(", line):
            shape = line.split("=")[1].split("all-gather")[0]
            numbers = [int(s) for s in shape.replace("[", ",").replace("]", ",").split(",") if s.strip().isdigit()]
            assert np.prod(numbers or [1]) <= 16384 // 2, line  # only sample slices move, never a leaf


def test_bad_input_is_loud():
    p = {"d": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        sp.make_masks(p, 1.0)
    with pytest.raises(ValueError, match="-0.1"):
        sp.prune(optax.sgd(1), sparsity=-0.1)
    with pytest.raises(ValueError, match=r"d/kernel: sparsity must be in \[0, 1\), got 1.5"):
        sp.make_masks(p, [jb.tree.Rule("d/kernel", 1.5)])
    with pytest.raises(ValueError, match="n=3, m=2"):
        sp.NM(3, 2)
    with pytest.raises(ValueError, match="d/kernel: input axis 6 is not divisible by m=4"):
        sp.make_masks(p, structure=sp.NM(2, 4))
    with pytest.raises(ValueError, match=r"d/bias: structure .* ndim >= 2, got shape \(4,\)"):
        sp.make_masks(p, 0.5, where=".*bias", structure=sp.Channel(-1))
    with pytest.raises(ValueError, match="'nothing' matches no leaf"):
        sp.make_masks(p, 0.5, where="nothing")
    with pytest.raises(ValueError, match="matches no leaf"):
        sp.prune(optax.sgd(1), sparsity=0.5, where=lambda path, x: False).init(p)
    with pytest.raises(ValueError, match=r"d/kernel: shape \(6, 4\) is not divisible into tiles \(4, 4\)"):
        sp.make_masks(p, 0.5, structure=sp.Tile((4, 4)))
    with pytest.raises(TypeError, match="Scope"):
        sp.make_masks(p, 0.5, scope="global")
    with pytest.raises(ValueError, match="needs the current params"):
        tx = sp.prune(optax.sgd(1), sparsity=0.5)
        tx.update(p, tx.init(p))
    with pytest.raises(ValueError, match="mask shape"):
        sp.apply_masks(p, {"d": {"kernel": jnp.ones((4, 6), bool), "bias": None}})
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\)"):
        sp.polynomial_schedule(final_sparsity=1.2, begin_step=0, end_step=10)


def test_dynamic_sparsity_can_start_from_the_largest_weights():
    w = jax.random.normal(jax.random.key(0), (32, 16))
    params = {"d": {"kernel": w}}
    tx = sp.rigl(optax.sgd(0.1), sparsity=0.75, key=jax.random.key(1), end_step=10, start=sp.Start.MAGNITUDE)
    mask = np.asarray(tx.init(params).masks["d"]["kernel"])
    kept = np.sort(np.abs(np.asarray(w)).ravel())[-mask.sum():]  # independent top-k by numpy
    assert mask.sum() == 128 and np.array_equal(np.sort(np.abs(np.asarray(w))[mask]), kept)
    random_mask = np.asarray(sp.rigl(optax.sgd(0.1), sparsity=0.75, key=jax.random.key(1), end_step=10)
                             .init(params).masks["d"]["kernel"])
    assert random_mask.sum() == 128 and not np.array_equal(random_mask, mask)
    with pytest.raises(TypeError, match="start must be"):
        sp.set_(optax.sgd(0.1), sparsity=0.5, key=jax.random.key(1), end_step=10, start="magnitude")


# --- fixes: one count rule, random scores on explicit meshes, mixed trees ----------------------

def test_a_constant_sparsity_prunes_round_s_n_eagerly_under_jit_and_in_prune():
    from jaxopt_big.sparsity import _masks
    ss, ns = np.arange(0, 1, 0.01), range(1, 401)
    eager = np.array([[_masks._count(s, n) for s in ss] for n in ns])
    np.testing.assert_array_equal(eager, [[round(s * n) for s in ss] for n in ns])
    # a traced sparsity is float32: at most one off, and only where s * n is within float32 rounding of a half
    traced = np.array([jax.vmap(functools.partial(_masks._count, n=n))(jnp.asarray(ss, jnp.float32)) for n in ns])
    off = traced != eager
    assert np.abs(traced - eager).max() <= 1
    assert np.all(np.abs(np.outer(ns, ss)[off] % 1 - 0.5) < 1e-5)
    # 0.7 * 45 is 31.5 in float32 and 31.499... in float64: every constant path prunes round(0.7 * 45) = 31
    w = {"d": {"kernel": jax.random.normal(jax.random.key(0), (9, 5))}}
    counts = [sp.make_masks(w, 0.7), sp.make_masks(w, np.float64(0.7)), jax.jit(lambda w: sp.make_masks(w, 0.7))(w)]
    for tx in (sp.prune(optax.sgd(0.1), sparsity=0.7), sp.prune(optax.sgd(0.1), sparsity=[jb.Rule("d", 0.7)])):
        counts.append(jax.jit(tx.update)(w, tx.init(w), w)[1].masks)
    assert [int((~m["d"]["kernel"]).sum()) for m in counts] == [round(0.7 * 45)] * 5


def _run(tx, params, steps):
    state, step = tx.init(params), jax.jit(tx.update)
    for _ in range(steps):
        updates, state = step(jax.tree.map(jnp.ones_like, params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state.masks


def test_random_scores_prune_and_dynamic_sparsity_on_explicit_sharding():
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    plain = {"a": {"kernel": jax.random.normal(jax.random.key(3), (16, 8))}}
    placed = jax.device_put(plain, jax.NamedSharding(mesh, jax.P("x", "y")))
    key = jax.random.key(1)
    runs = [(sp.prune(optax.sgd(0.1), sparsity=0.5, score=sp.random, key=key), 1),   # random masks
            (sp.set_(optax.sgd(0.1), sparsity=0.5, key=key, update_every=1, end_step=9), 2),  # random regrowth
            (sp.rigl(optax.sgd(0.1), sparsity=0.5, key=key, end_step=9), 0)]  # random initial masks
    want = [_run(tx, plain, steps) for tx, steps in runs]
    for with_mesh in (False, True):
        with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
            scores = sp.random(placed, key)
            got = [_run(tx, placed, steps) for tx, steps in runs]
        chex.assert_trees_all_equal(scores, sp.random(plain, key))
        assert scores["a"]["kernel"].sharding.spec == jax.P("x", "y")
        for (params, masks), (want_params, want_masks) in zip(got, want):
            chex.assert_trees_all_equal(masks, want_masks)
            chex.assert_trees_all_close(params, want_params, rtol=1e-6)
            assert masks["a"]["kernel"].sharding.spec == params["a"]["kernel"].sharding.spec == jax.P("x", "y")


def _mixed():
    p = {"q": {"kernel": jnp.arange(32.0).reshape(8, 4) - 9}, "f": {"kernel": jnp.arange(32.0).reshape(8, 4) + 1}}
    return p, jb.quant.quantize_params(p, [jb.Rule("q", jb.quant.QuantSpec())])


def test_compressed_leaves_are_refused_when_selected_and_kept_otherwise():
    p, mixed = _mixed()
    refused = r"q/kernel is a compressed QArray \(int8\), not a float array"
    with pytest.raises(ValueError, match="make_masks: " + refused):
        sp.make_masks(mixed, 0.5)
    with pytest.raises(ValueError, match="make_masks: " + refused):
        sp.make_masks(mixed, [jb.Rule("q", 0.5)])
    with pytest.raises(ValueError, match="global_threshold: " + refused):
        sp.global_threshold(mixed, 0.5)
    # magnitude scores a compressed leaf on its dense value; masking the compressed leaf is refused
    scores = sp.magnitude(mixed)
    np.testing.assert_array_equal(scores["q"]["kernel"], np.abs(np.asarray(mixed["q"]["kernel"].dense())))
    np.testing.assert_array_equal(scores["f"]["kernel"], np.abs(np.asarray(p["f"]["kernel"])))
    with pytest.raises(ValueError, match="apply_masks: " + refused):
        sp.apply_masks(mixed, sp.make_masks(scores, 0.5))
    # restricted with where=, the dense leaf is pruned and the compressed one passes through untouched
    masks = sp.make_masks(mixed, 0.5, where="f/kernel")
    assert masks["q"]["kernel"] is None
    chex.assert_trees_all_equal(masks, sp.make_masks(p, 0.5, where="f/kernel"))
    out = sp.apply_masks(mixed, sp.make_masks(scores, 0.5, where="f/kernel"))
    assert out["q"]["kernel"] is mixed["q"]["kernel"]
    np.testing.assert_array_equal(out["f"]["kernel"], np.where(p["f"]["kernel"] > 16, p["f"]["kernel"], 0))
    assert float(sp.global_threshold(mixed, 0.5, where="f/kernel")) == 16.0
    with pytest.raises(ValueError, match="mask tree does not match"):
        sp.apply_masks(p, {"f": {"kernel": None}})


def test_old_names_block_and_one_shot_still_work_and_warn():
    with pytest.warns(DeprecationWarning, match=r"jb\.sparsity\.Block is deprecated.*jb\.sparsity\.Tile"):
        old_block = sp.Block
    assert old_block is sp.Tile and "Block" not in sp.__all__
    with pytest.warns(DeprecationWarning, match=r"jb\.sparsity\.one_shot is deprecated.*jb\.sparsity\.step_schedule"):
        schedule = sp.one_shot(0.75, step=3)
    assert [float(schedule(t)) for t in range(5)] == [0.0, 0.0, 0.0, 0.75, 0.75]
    with pytest.raises(AttributeError, match="has no attribute 'Blocks'"):
        sp.Blocks  # noqa: B018


MASK_CASES = [(False, scope, structure, 0.5) for scope in sp.Scope
              for structure in (sp.Unstructured(), sp.Tile((2, 2)), sp.Channel(-1))] + [
    (False, sp.Scope.LAYER, sp.NM(2, 4), None), (True, sp.Scope.GLOBAL, sp.Unstructured(), 0.5),
    (True, sp.Scope.LAYER, sp.Tile((2, 2)), 0.5)]


@pytest.mark.parametrize("with_mesh,scope,structure,sparsity", MASK_CASES, ids=str)
def test_masks_on_explicit_sharding_equal_unsharded(explicit_mesh, with_mesh, scope, structure, sparsity):
    # Unstructured: over SORT_BELOW scores per leaf, so the sharded counting passes run (smaller ones are sorted)
    w = jax.random.normal(jax.random.key(0), (256, 256) if structure == sp.Unstructured() else (8, 16))
    scores = {"a": {"kernel": jax.device_put(w, jax.NamedSharding(explicit_mesh, jax.P("data", "model")))}, "b": {"kernel": jax.device_put(w.T, jax.NamedSharding(explicit_mesh, jax.P()))}}
    plain = {"a": {"kernel": w}, "b": {"kernel": w.T}}
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        got = sp.make_masks(scores, sparsity, scope=scope, structure=structure)
        if not isinstance(structure, sp.NM):
            t = sp.global_threshold(scores, 0.3)
            assert float(t) == float(sp.global_threshold(plain, 0.3))
    want = sp.make_masks(plain, sparsity, scope=scope, structure=structure)
    np.testing.assert_array_equal(got["a"]["kernel"], want["a"]["kernel"])
    np.testing.assert_array_equal(got["b"]["kernel"], want["b"]["kernel"])
    assert got["a"]["kernel"].sharding.spec == jax.P("data", "model")


@pytest.mark.parametrize("with_mesh", [False, True])
def test_erk_prune_update_on_explicit_sharding_equals_unsharded(explicit_mesh, with_mesh):
    w = jax.random.normal(jax.random.key(1), (8, 16))
    params = {"a": {"kernel": jax.device_put(w, jax.NamedSharding(explicit_mesh, jax.P("data", "model")))}, "b": {"kernel": jax.device_put(w[:, :8], jax.NamedSharding(explicit_mesh, jax.P()))}}
    plain = jax.tree.map(np.asarray, params)
    tx = sp.prune(optax.sgd(0.1), sparsity=0.5, distribution=sp.ERK())
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
        got = optax.apply_updates(params, updates)
    want = optax.apply_updates(plain, tx.update(plain, tx.init(plain), plain)[0])
    for k in "ab":
        np.testing.assert_allclose(got[k]["kernel"], want[k]["kernel"], rtol=1e-6)
    assert got["a"]["kernel"].sharding.spec == jax.P("data", "model")


def test_nm_sparsity_given_as_a_numpy_scalar_is_checked_like_a_python_number():
    scores = {"d": {"kernel": jnp.arange(32.0).reshape(8, 4)}}
    for bad in (np.float32(0.3), jnp.float32(0.3), 0.3):
        with pytest.raises(ValueError, match=r"NM\(2, 4\) prunes 0.5"):
            sp.make_masks(scores, bad, structure=sp.NM(2, 4))
        with pytest.raises(ValueError, match=r"NM\(2, 4\) prunes 0.5"):
            sp.prune(optax.sgd(1.0), sparsity=bad, structure=sp.NM(2, 4))
    np.testing.assert_array_equal(sp.make_masks(scores, np.float32(0.5), structure=sp.NM(2, 4))["d"]["kernel"],
                                  sp.make_masks(scores, 0.5, structure=sp.NM(2, 4))["d"]["kernel"])
    np.testing.assert_array_equal(sp.make_masks(scores, np.float64(0.25))["d"]["kernel"],
                                  sp.make_masks(scores, 0.25)["d"]["kernel"])


def _prune_setup():
    w = jax.random.normal(jax.random.key(4), (8, 6))
    g = jax.random.normal(jax.random.key(5), (8, 6))
    return {"d": {"kernel": w}}, {"d": {"kernel": g}}


def test_prune_masks_the_gradient_before_the_inner_optimizer():
    params, grads = _prune_setup()
    tx = sp.prune(optax.adam(1e-2), sparsity=0.5, update_every=1000)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    pruned = ~np.asarray(state.masks["d"]["kernel"])
    adam = state.inner[0]
    assert pruned.sum() == 24
    assert not np.asarray(adam.mu["d"]["kernel"])[pruned].any() and not np.asarray(adam.nu["d"]["kernel"])[pruned].any()
    assert np.asarray(adam.mu["d"]["kernel"])[~pruned].all()


def test_prune_with_global_clipping_inside_matches_a_masked_reference():
    params, grads = _prune_setup()
    tx = sp.prune(optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(1.0)), sparsity=0.5, update_every=1000)
    updates, state = tx.update(grads, tx.init(params), params)
    got = np.asarray(optax.apply_updates(params, updates)["d"]["kernel"])
    w, g = np.asarray(params["d"]["kernel"]), np.asarray(grads["d"]["kernel"])
    keep = np.abs(w) > np.median(np.abs(w))                                # 24 of 48, no ties
    gm = np.where(keep, g, 0.0)
    want = np.where(keep, w - gm * min(1.0, 0.1 / np.linalg.norm(gm)), 0.0)  # the norm of the masked gradient
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("with_mesh", [False, True])
def test_packed_sparse_on_explicit_sharding_unpacks_to_the_pruned_kernel(explicit_mesh, with_mesh):
    w = jax.random.normal(jax.random.key(8), (8, 16))
    pruned = np.where(np.abs(np.asarray(w)) > 0.7, np.asarray(w), 0)
    params = {"d": {"kernel": jax.device_put(pruned, jax.NamedSharding(explicit_mesh, jax.P("data", "model")))}}
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        packed = sp.pack_params(params)  # the running count over the mask refused its sharded axis
        dense = jb.leaves.densify(packed)["d"]["kernel"]
        jitted = jax.jit(lambda t: t["d"]["kernel"].dense())(packed)
        fraction = sp.sparsity(packed)["d/kernel"]
    np.testing.assert_array_equal(dense, pruned)
    np.testing.assert_array_equal(jitted, pruned)
    assert fraction == np.mean(pruned == 0)
