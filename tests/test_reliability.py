"""Regression tests of issue 16 (reliability): one test per defect class, each failing before its fix."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big import quant as q
from jaxopt_big import sparsity as sp

EXPLICIT = (jax.sharding.AxisType.Explicit,) * 2


def _explicit_mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=EXPLICIT)


def _sharded(x, mesh, spec):
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


# --- 7. explicit sharding, with and without jax.set_mesh --------------------------------------

MASK_CASES = [(False, scope, structure, 0.5) for scope in sp.Scope
              for structure in (sp.Unstructured(), sp.Tile((2, 2)), sp.Channel(-1))] + [
    (False, sp.Scope.LAYER, sp.NM(2, 4), None), (True, sp.Scope.GLOBAL, sp.Unstructured(), 0.5),
    (True, sp.Scope.LAYER, sp.Tile((2, 2)), 0.5)]


@pytest.mark.parametrize("with_mesh,scope,structure,sparsity", MASK_CASES, ids=str)
def test_7_masks_on_explicit_sharding_equal_unsharded(with_mesh, scope, structure, sparsity):
    mesh = _explicit_mesh()
    # Unstructured: over SORT_BELOW scores per leaf, so the sharded counting passes run (smaller ones are sorted)
    w = jax.random.normal(jax.random.key(0), (256, 256) if structure == sp.Unstructured() else (8, 16))
    scores = {"a": {"kernel": _sharded(w, mesh, jax.P("data", "model"))}, "b": {"kernel": _sharded(w.T, mesh, jax.P())}}
    plain = {"a": {"kernel": w}, "b": {"kernel": w.T}}
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        got = sp.make_masks(scores, sparsity, scope=scope, structure=structure)
        if not isinstance(structure, sp.NM):
            t = sp.global_threshold(scores, 0.3)
            assert float(t) == float(sp.global_threshold(plain, 0.3))
    want = sp.make_masks(plain, sparsity, scope=scope, structure=structure)
    np.testing.assert_array_equal(got["a"]["kernel"], want["a"]["kernel"])
    np.testing.assert_array_equal(got["b"]["kernel"], want["b"]["kernel"])
    assert got["a"]["kernel"].sharding.spec == jax.P("data", "model")


@pytest.mark.parametrize("with_mesh", [False, True])
def test_7_erk_and_prune_update_on_explicit_sharding(with_mesh):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(1), (8, 16))
    params = {"a": {"kernel": _sharded(w, mesh, jax.P("data", "model"))}, "b": {"kernel": _sharded(w[:, :8], mesh, jax.P())}}
    plain = jax.tree.map(np.asarray, params)
    tx = sp.prune(optax.sgd(0.1), sparsity=0.5, distribution=sp.ERK())
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
        got = optax.apply_updates(params, updates)
    want = optax.apply_updates(plain, tx.update(plain, tx.init(plain), plain)[0])
    for k in "ab":
        np.testing.assert_allclose(got[k]["kernel"], want[k]["kernel"], rtol=1e-6)
    assert got["a"]["kernel"].sharding.spec == jax.P("data", "model")


@pytest.mark.parametrize("with_mesh,size", [(False, 2), (False, 8), (True, 4)])
def test_7_group_quantization_along_a_sharded_axis(with_mesh, size):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(2), (8, 16))
    params = {"d": {"kernel": _sharded(w, mesh, jax.P("data", "model"))}}
    spec = q.QuantSpec(bits=4, granularity=q.Group(size))
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        got = q.quantize_params(params, spec)["d"]["kernel"]
        fake = q.fake_quant_params(params, spec)["d"]["kernel"]
    want = q.quantize(w, spec)
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(got.dense(), want.dense())
    np.testing.assert_array_equal(fake, want.dense())


# --- 2. non-finite weights: eager ValueError naming the leaf; traced NaN confined to its group -------

BAD = [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)]


@pytest.mark.parametrize("name,bad", BAD)
def test_2_eager_non_finite_raises_naming_the_leaf(name, bad):
    params = {"d": {"kernel": jnp.ones((8, 4)).at[2, 1].set(bad)}}
    leaf = params["d"]["kernel"]
    spec = q.QuantSpec(bits=4, granularity=q.PER_CHANNEL)
    calls = [lambda: q.quantize_params(params, spec), lambda: q.fake_quant_params(params, spec),
             lambda: q.quantize_params(params, q.Float8()), lambda: q.quantize_params(params, q.Binary()),
             lambda: jb.lowrank.factorize_params(params, rank=2),
             lambda: sp.make_masks(sp.magnitude(params), 0.5), lambda: sp.global_threshold(params, 0.5),
             lambda: q.cluster(params, 2, key=jax.random.key(0)),
             lambda: sp.wanda_kernel(leaf, jnp.ones(8), path="d/kernel"),
             lambda: sp.sparsegpt_kernel(leaf, jnp.eye(8), path="d/kernel"),
             lambda: q.gptq_kernel(leaf, jnp.eye(8), q.QuantSpec(), path="d/kernel")]
    for call in calls:
        with pytest.raises(ValueError, match=r"d/kernel: .*contain NaN or Inf \(1 of 32 values\)"):
            call()


@pytest.mark.parametrize("name,bad", BAD)
@pytest.mark.parametrize("fmt", [q.QuantSpec(bits=4, granularity=q.PER_CHANNEL),
                                 q.QuantSpec(bits=4, granularity=q.PER_CHANNEL, narrow=False),
                                 q.QuantSpec(bits=4, symmetric=False, granularity=q.PER_CHANNEL),
                                 q.QuantSpec(bits=4, symmetric=False, granularity=q.PER_CHANNEL, calibration=q.MSE(steps=4)),
                                 q.QuantSpec(bits=4, granularity=q.PER_CHANNEL, calibration=q.Percentile(99.0)),
                                 q.QuantSpec(bits=4, granularity=q.Group(4)), q.Binary(), q.Ternary()], ids=repr)
def test_2_traced_non_finite_poisons_only_its_own_channel(name, bad, fmt):
    w = jax.random.normal(jax.random.key(0), (8, 4))
    poisoned = w.at[2, 1].set(bad)
    fake = jax.jit(fmt.fake_quant)(poisoned)
    dense = jax.jit(lambda x: fmt.quantize(x).dense())(poisoned)
    group = np.zeros((8, 4), bool)
    group[(slice(0, 4) if isinstance(getattr(fmt, "granularity", None), q.Group) else slice(None)), 1] = True
    for out in (fake, dense):
        assert np.isnan(np.asarray(out)[group]).all()            # the poisoned group is NaN, visibly
        np.testing.assert_allclose(np.asarray(out)[~group], np.asarray(fmt.fake_quant(w))[~group], rtol=1e-6)


def test_2_traced_non_finite_factorize_gives_nan_factors_only_for_that_leaf():
    w = jax.random.normal(jax.random.key(0), (8, 4))
    params = {"a": {"kernel": w.at[0, 0].set(jnp.inf)}, "b": {"kernel": w}}
    out = jax.jit(lambda p: jb.lowrank.factorize_params(p, rank=2))(params)
    assert np.isnan(np.asarray(out["a"]["kernel"].dense())).all()
    np.testing.assert_allclose(out["b"]["kernel"].dense(), jb.lowrank.factorize(w, rank=2).dense(), rtol=1e-5, atol=1e-6)


# --- 3. one set of argument checks: numpy scalars accepted, bools / NaN / Inf rejected ----------------

def test_3_numpy_scalars_are_checked_like_python_numbers():
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


@pytest.mark.parametrize("n, sparsity", [(1, 2 / 3), (1, np.float32(2 / 3)), (2, 1 / 3), (2, jnp.float32(1 / 3))])
def test_3_n_of_3_takes_the_sparsity_as_written(n, sparsity):
    # 2 / 3 and 1 - 1 / 3 differ in their last bit; float32 thirds differ more
    scores = jax.random.uniform(jax.random.key(0), (9, 4))
    mask = np.asarray(sp.make_masks({"d": {"kernel": scores}}, sparsity, structure=sp.NM(n, 3))["d"]["kernel"])
    assert (mask.reshape(3, 3, 4).sum(axis=1) == n).all()
    f = sp.polynomial_schedule(final_sparsity=np.float32(0.5), begin_step=np.int64(0), end_step=np.int32(10))
    assert float(f(10)) == 0.5
    jb.distill.combine(lambda logits, y: logits.sum(-1), None, student=lambda p, x: x, alpha=np.float32(0.5),
                       temperature=np.float64(2.0))
    assert q.QuantSpec(bits=np.int64(4)).bits == 4 and type(q.QuantSpec(bits=np.int64(4)).bits) is int


@pytest.mark.parametrize("call,error,match", [
    (lambda: sp.polynomial_schedule(final_sparsity=0.5, begin_step=0, end_step=10, power=float("nan")),
     ValueError, r"power must be a finite number > 0, got nan"),
    (lambda: jb.lowrank.lora_init({"d": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2, alpha=float("inf")),
     ValueError, r"alpha must be a finite number, got inf"),
    (lambda: jb.lowrank.lora_init({"d": {"kernel": jnp.ones((4, 4))}}, jax.random.key(0), rank=2, alpha=float("nan")),
     ValueError, r"alpha must be a finite number, got nan"),
    (lambda: jb.distill.kd_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), float("inf")),
     ValueError, r"temperature must be a finite number > 0, got inf"),
    (lambda: sp.NM(True, 4), TypeError, r"NM.n must be an int, got True"),
    (lambda: jb.checkpoint.Manager("/nonexistent/never", max_to_keep=True), TypeError, r"max_to_keep .*got True"),
    (lambda: q.QuantSpec(bits=True), TypeError, r"QuantSpec.bits must be an int, got True"),
    (lambda: sp.make_masks({"d": {"kernel": jnp.ones((4, 4))}}, float("nan")), ValueError, r"sparsity must be in"),
    (lambda: sp.prune(optax.sgd(1.0), sparsity=0.5, update_every=np.float32(2)), TypeError, r"update_every must be an int"),
    (lambda: jb.distill.combine(lambda l, y: l, None, student=lambda p, x: x, alpha=float("nan"), temperature=1.0),
     ValueError, r"alpha must be a finite number in \[0, 1\], got nan"),
], ids=["power_nan", "alpha_inf", "alpha_nan", "temperature_inf", "nm_bool", "max_to_keep_bool", "bits_bool",
        "sparsity_nan", "update_every_float", "combine_alpha_nan"])
def test_3_bools_nan_and_inf_are_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- 8. techniques compose on trees that hold compressed leaves -----------------------------------

def _mixed():
    w = jax.random.normal(jax.random.key(3), (8, 4))
    return {"a": {"kernel": q.quantize(w, q.QuantSpec())}, "b": {"kernel": w, "bias": jnp.ones(4)}}


def test_8_prune_and_dynamic_sparsity_on_a_tree_with_a_qarray():
    params = _mixed()
    for tx in (sp.prune(optax.sgd(0.1), sparsity=0.5, where="b/kernel"),
               sp.rigl(optax.sgd(0.1), sparsity=0.5, where="b/kernel", key=jax.random.key(0), end_step=10)):
        state = tx.init(params)
        assert state.masks["a"]["kernel"] is None
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        new = optax.apply_updates(params, updates)
        assert float(jnp.mean(new["b"]["kernel"] == 0)) == 0.5
        np.testing.assert_array_equal(new["a"]["kernel"].values, params["a"]["kernel"].values)
    with pytest.raises(ValueError, match=r"prune: a/kernel is a compressed QArray \(int8\).*leave it out of where="):
        sp.prune(optax.sgd(0.1), sparsity=0.5).init(params)


def test_8_quantize_and_factorize_leave_other_compressed_leaves_alone():
    params = _mixed()
    out = q.quantize_params(params, q.QuantSpec(bits=4), where="b/kernel")
    assert out["a"]["kernel"] is params["a"]["kernel"] and out["b"]["kernel"].bits == 4
    low = jb.lowrank.factorize_params(params, rank=2, where="b/kernel")
    assert low["a"]["kernel"] is params["a"]["kernel"] and low["b"]["kernel"].v.shape == (2, 4)


# --- 9. errors that name the leaf -------------------------------------------------------------------

def test_9_zero_size_kernels_and_pack_of_compressed_leaves_name_the_leaf():
    empty = {"d": {"kernel": jnp.zeros((0, 4))}}
    with pytest.raises(ValueError, match=r"d/kernel: cannot prune a zero-size leaf \(shape \(0, 4\)\)"):
        sp.make_masks(empty, 0.5)
    with pytest.raises(ValueError, match=r"d/kernel: cannot prune a zero-size leaf"):
        sp.global_threshold(empty, 0.5)
    for granularity in (q.PER_TENSOR, q.PER_CHANNEL):
        with pytest.raises(ValueError, match=r"d/kernel: cannot quantize a zero-size array \(shape \(0, 4\)\)"):
            q.quantize_params(empty, q.QuantSpec(granularity=granularity))
    params = {"d": {"kernel": jnp.arange(16.0).reshape(4, 4)}}
    qtree = q.quantize_params(params, q.QuantSpec())
    with pytest.raises(ValueError, match=r"d/kernel: cannot pack a compressed QArray \(int8\) as sparse"):
        sp.pack_params(qtree, sp.make_masks(sp.magnitude(params), 0.5))
    with pytest.raises(ValueError, match=r"d/kernel: cannot pack a compressed QArray"):
        sp.pack_params(qtree)


# --- 11. tests that catch planted one-line bugs -----------------------------------------------------

def _prune_setup():
    w = jax.random.normal(jax.random.key(4), (8, 6))
    g = jax.random.normal(jax.random.key(5), (8, 6))
    return {"d": {"kernel": w}}, {"d": {"kernel": g}}


def test_11_prune_masks_the_gradient_before_the_inner_optimizer():
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


def test_11_prune_with_global_clipping_inside_matches_a_masked_reference():
    params, grads = _prune_setup()
    tx = sp.prune(optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(1.0)), sparsity=0.5, update_every=1000)
    updates, state = tx.update(grads, tx.init(params), params)
    got = np.asarray(optax.apply_updates(params, updates)["d"]["kernel"])
    w, g = np.asarray(params["d"]["kernel"]), np.asarray(grads["d"]["kernel"])
    keep = np.abs(w) > np.median(np.abs(w))                                # 24 of 48, no ties
    gm = np.where(keep, g, 0.0)
    want = np.where(keep, w - gm * min(1.0, 0.1 / np.linalg.norm(gm)), 0.0)  # the norm of the masked gradient
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_11_float8_fake_quant_has_no_gradient_outside_a_fixed_range():
    x = jnp.array([0.5, -1.0, 3.0, -7.5, 100.0])
    scale = 4.0 / q.Float8().max                                               # range [-4, 4]
    out = q.Float8().fake_quant(x, scale)
    np.testing.assert_allclose(out[2:], [3.0, -4.0, 4.0], rtol=0.07)
    grad = jax.grad(lambda x: q.Float8().fake_quant(x, scale).sum())(x)
    np.testing.assert_array_equal(grad, [1.0, 1.0, 1.0, 0.0, 0.0])


# --- the shared argument checks (_checks): properties ---------------------------------------------

import hypothesis  # noqa: E402
import hypothesis.strategies as st  # noqa: E402

from jaxopt_big import _checks  # noqa: E402

FORMS = [lambda v: v, np.float32, np.float64, lambda v: np.asarray(v, np.float32), lambda v: jnp.asarray(v, jnp.float32)]
INT_FORMS = [lambda v: v, np.int8, np.int64, lambda v: np.asarray(v), lambda v: jnp.asarray(v, jnp.int32)]


@hypothesis.given(v=st.floats(allow_nan=True, allow_infinity=True, width=32), form=st.sampled_from(FORMS),
                  closed=st.booleans())
@hypothesis.settings(max_examples=60, deadline=None)
def test_checks_fraction_accepts_every_scalar_form_exactly_in_range(v, form, closed):
    inside = 0 <= v < 1 or (closed and v == 1)
    if inside:
        assert _checks.fraction("s", form(v), closed=closed) == v
        assert isinstance(_checks.fraction("s", form(v), closed=closed), float)
    else:
        with pytest.raises(ValueError, match=r"s must be in \[0, 1[)\]], got"):
            _checks.fraction("s", form(v), closed=closed)


@hypothesis.given(v=st.integers(-300, 300), form=st.sampled_from(INT_FORMS), low=st.integers(-5, 5))
@hypothesis.settings(max_examples=60, deadline=None)
def test_checks_integer_accepts_every_int_form_and_bounds(v, form, low):
    v = int(np.int8(np.clip(v, -128, 127)))
    if v >= low:
        assert _checks.integer("n", form(v), low=low) == v and type(_checks.integer("n", form(v))) is int
    else:
        with pytest.raises(ValueError, match=rf"n must be an int >= {low}, got"):
            _checks.integer("n", form(v), low=low)


@pytest.mark.parametrize("bad", [True, np.bool_(False), jnp.asarray(True), "1", None, [1], 1.5, np.float32(2.0)])
def test_checks_integer_rejects_bools_strings_and_floats(bad):
    with pytest.raises(TypeError, match="n must be an int"):
        _checks.integer("n", bad)


@hypothesis.given(v=st.floats(allow_nan=True, allow_infinity=True), allow_inf=st.booleans())
@hypothesis.settings(max_examples=60, deadline=None)
def test_checks_number_rejects_nan_always_and_inf_unless_allowed(v, allow_inf):
    ok = not np.isnan(v) and (allow_inf or np.isfinite(v)) and v > 0
    if ok:
        assert _checks.number("t", v, above=0, allow_inf=allow_inf) == v
    else:
        with pytest.raises(ValueError, match=r"t must be a (finite )?number > 0, got"):
            _checks.number("t", v, above=0, allow_inf=allow_inf)
    with pytest.raises(TypeError, match="t must be a number"):
        _checks.number("t", bool(v == v))


def test_checks_traced_values_pass_only_where_allowed():
    assert jax.jit(lambda s: _checks.fraction("s", s, traced=True) * 2)(0.25) == 0.5
    with pytest.raises(TypeError, match="s must be a concrete number"):
        jax.jit(lambda s: _checks.fraction("s", s))(0.25)
    _checks.finite([("a", jnp.ones(2)), ("i", jnp.arange(3)), ("e", jnp.zeros(0))])
    jax.jit(lambda x: _checks.finite([("a", x)]) or x)(jnp.array([jnp.nan]))  # traced: not inspected
    with pytest.raises(ValueError, match=r"b: w contain NaN or Inf \(2 of 3 values\)"):
        _checks.finite([("a", jnp.ones(2)), ("b", np.array([np.inf, 1.0, np.nan]))], "w")


# --- 4b. explicit sharding in factorize / cluster / formats -----------------------------------------

FACTORIZE_CASES = [{"rank": 3}, {"energy": 0.9}, {"rank": 3, "randomized": True, "key": jax.random.key(0)}]


@pytest.mark.parametrize("with_mesh", [False, True])
@pytest.mark.parametrize("how", FACTORIZE_CASES, ids=lambda how: "-".join(how))
def test_4b_factorize_on_explicit_sharding_equals_unsharded(with_mesh, how):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(3), (8, 16))
    params = {"d": {"kernel": _sharded(w, mesh, jax.P("data", "model")), "bias": jnp.zeros(16)}}
    want = jb.lowrank.factorize_params({"d": {"kernel": w, "bias": jnp.zeros(16)}}, **how)["d"]["kernel"]
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        got = jb.lowrank.factorize_params(params, **how)["d"]["kernel"]
        dense = got.dense()  # u @ v contracts under the mesh
        if "energy" not in how:  # energy= picks the rank on the host: not jittable
            jitted = jax.jit(lambda w: jb.lowrank.factorize(w, **how))(params["d"]["kernel"])
            np.testing.assert_array_equal(jitted.v, jb.lowrank.factorize(w, **how).v)
    np.testing.assert_array_equal(got.u, want.u)
    np.testing.assert_array_equal(got.v, want.v)
    np.testing.assert_allclose(dense, want.dense(), atol=1e-6)
    # u keeps the kernel's rows, v its columns; the rank axis both contract is whole
    assert (got.u.sharding.spec, got.v.sharding.spec) == (jax.P("data", None), jax.P(None, "model"))


@pytest.mark.parametrize("with_mesh", [False, True])
def test_4b_lora_on_explicit_sharding_equals_unsharded(with_mesh):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(6), (8, 16))
    params = {"d": {"kernel": _sharded(w, mesh, jax.P("data", "model"))}}
    want = jb.lowrank.lora_init({"d": {"kernel": w}}, jax.random.key(7), rank=2, alpha=4.0)["d"]["kernel"]
    want = dataclasses.replace(want, b=jnp.ones_like(want.b))
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        got = jb.lowrank.lora_init(params, jax.random.key(7), rank=2, alpha=4.0)["d"]["kernel"]
        got = dataclasses.replace(got, b=jnp.ones_like(got.b))  # a non-zero update: a @ b contracts
        dense = got.dense()
    np.testing.assert_array_equal(got.a, want.a)
    np.testing.assert_allclose(dense, want.dense(), atol=1e-6)
    assert (got.a.sharding.spec, got.b.sharding.spec) == (jax.P("data", None), jax.P(None, "model"))


@pytest.mark.parametrize("with_mesh", [False, True])
def test_4b_cluster_on_explicit_sharding_equals_unsharded(with_mesh):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(4), (8, 16))
    params = {"d": {"kernel": _sharded(w, mesh, jax.P("data", "model"))}}
    key = jax.random.key(5)
    want = q.cluster({"d": {"kernel": w}}, 4, key=key)["d"]["kernel"]
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        got = q.cluster(params, 4, key=key)["d"]["kernel"]
        dense = got.dense()
        jitted = jax.jit(lambda p: q.cluster(p, 4, key=key)["d"]["kernel"].dense())(params)
    np.testing.assert_array_equal(got.codebook, want.codebook)
    np.testing.assert_array_equal(got.indices(), want.indices())
    np.testing.assert_array_equal(dense, want.dense())
    np.testing.assert_array_equal(jitted, want.dense())


@pytest.mark.parametrize("with_mesh", [False, True])
def test_4b_packed_sparse_on_explicit_sharding_unpacks_to_the_pruned_kernel(with_mesh):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(8), (8, 16))
    pruned = np.where(np.abs(np.asarray(w)) > 0.7, np.asarray(w), 0)
    params = {"d": {"kernel": _sharded(pruned, mesh, jax.P("data", "model"))}}
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        packed = sp.pack_params(params)  # the running count over the mask refused its sharded axis
        dense = jb.leaves.densify(packed)["d"]["kernel"]
        jitted = jax.jit(lambda t: t["d"]["kernel"].dense())(packed)
        fraction = sp.sparsity(packed)["d/kernel"]
    np.testing.assert_array_equal(dense, pruned)
    np.testing.assert_array_equal(jitted, pruned)
    assert fraction == np.mean(pruned == 0)


@pytest.mark.parametrize("with_mesh", [False, True])
@pytest.mark.parametrize("fmt", [q.Binary(), q.Ternary(), q.Binary(axis=None)], ids=str)
def test_4b_binary_and_ternary_on_explicit_sharding_equal_unsharded(with_mesh, fmt):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(6), (8, 16))
    sharded = _sharded(w, mesh, jax.P("data", "model"))
    want = fmt.quantize(w)
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
        got = q.quantize_params({"d": {"kernel": sharded}}, fmt)["d"]["kernel"]
        dense = got.dense()
        jitted = jax.jit(lambda w: q.quantize(w, fmt).dense())(sharded)
        fake = q.fake_quant(sharded, fmt)
    np.testing.assert_array_equal(got.codes, want.codes)
    # the scale is a mean over the sharded rows: summed shard by shard, so equal up to rounding
    np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)
    for x in (dense, jitted, fake):
        np.testing.assert_allclose(x, want.dense(), rtol=1e-6)


# --- options given NumPy or JAX scalars keep the Python numbers ----------------------------------

SCALARS = {  # a scalar maker for Python ints and floats alike
    "numpy": lambda v: np.int64(v) if isinstance(v, int) else np.float32(v),
    "numpy_0d": lambda v: np.asarray(v, np.int32 if isinstance(v, int) else np.float32),
    "jax": jnp.asarray,
}
OPTIONS = [  # (builder of an option from a scalar-maker, the values it is fed)
    lambda f: jb.Wanda(f(0.5)), lambda f: jb.Magnitude(f(0.25)),
    lambda f: jb.SparseGPT(f(0.5), block_size=f(64), damp=f(0.125)),
    lambda f: jb.GPTQ(q.QuantSpec(bits=4), block_size=f(32), damp=f(0.25)), lambda f: jb.Plan(sparsity=f(0.5)),
    lambda f: q.Ternary(threshold=f(0.5), axis=f(0)), lambda f: q.Binary(axis=f(0)),
    lambda f: jb.train.EarlyStopping(patience=f(3), min_delta=f(0.5)),
    lambda f: jb.train.ReduceOnPlateau(factor=f(0.5), min_lr=f(0.25)),
    lambda f: jb.zoo.BertConfig(hidden=f(64), heads=f(4), eps=f(0.5)),
    lambda f: jb.zoo.LlamaConfig(vocab_size=f(64), hidden_size=f(32), num_layers=f(2), num_heads=f(4),
                                 num_kv_heads=f(2), intermediate_size=f(64), rope_theta=f(500.0), rms_eps=f(0.25)),
]


@pytest.mark.parametrize("make", SCALARS)
@pytest.mark.parametrize("option", range(len(OPTIONS)))
def test_options_given_numpy_or_jax_scalars_equal_and_hash_as_python_numbers(option, make):
    want = OPTIONS[option](lambda v: v)
    got = OPTIONS[option](SCALARS[make])
    assert got == want and hash(got) == hash(want)  # exact values: 0.5, 0.25, 0.125, 500 are float32-exact


def test_llama_config_names_a_bad_field_with_its_type():
    with pytest.raises(TypeError, match=r"LlamaConfig.hidden_size must be an int, got 32.5"):
        jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32.5, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
    with pytest.raises(TypeError, match=r"LlamaConfig.attention_bias must be a bool, got 'false'"):
        jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, attention_bias="false")


def test_oneshot_with_a_jax_scalar_sparsity_equals_the_python_number():
    from flax import nnx
    c = jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
    model = jb.zoo.Llama(c, rngs=nnx.Rngs(0))
    cal = [jax.random.randint(jax.random.key(0), (2, 8), 0, 64)]
    masks = []
    for s in (0.5, jnp.float32(0.5)):
        out, _ = jb.oneshot.compress(model, None, cal, jb.Recipe([jb.Rule(r"layers/.*", jb.Plan(sparsity=jb.Wanda(s)))]),
                                     progress=False)
        masks.append(jax.tree.map(lambda x: np.asarray(x) != 0, jb.leaves.densify(out)))
    jax.tree.map(np.testing.assert_array_equal, masks[0], masks[1])


# --- datasets and half-precision logits: no silent truncation, no NaN loss, no bf16 sums ---------

def test_evaluate_and_fit_refuse_inputs_and_labels_that_do_not_pair_up():
    ds = jb.data.Dataset(np.ones((10, 3), np.float32), np.arange(7) % 3)
    with pytest.raises(ValueError, match=r"evaluate.ds has 10 inputs \(x\) but 7 labels \(y\)"):
        jb.train.evaluate(lambda p, x: x @ p, jnp.eye(3), ds)
    tx = optax.sgd(0.1)
    step = jb.train.make_step(jb.train.classifier_loss(lambda p, x: x @ p), tx)
    with pytest.raises(ValueError, match=r"fit.train has 10 inputs \(x\) but 7 labels \(y\)"):
        jb.train.fit(step, jb.train.TrainState.create(jnp.eye(3), tx), ds, epochs=1, batch_size=2,
                     key=jax.random.key(0), progress=False)


def test_evaluate_names_a_label_outside_the_classes():
    x = np.eye(4, 3, dtype=np.float32)
    for y, match in [(np.array([0, 1, 5, -1]), r"evaluate.ds.y\[2\] = 5 is not a class of the model's 3 logits "
                                                 r"\(2 labels outside \[0, 3\)\)"),
                     (np.array([0, -1, 1, 2]), r"evaluate.ds.y\[1\] = -1 ")]:
        with pytest.raises(ValueError, match=match):
            jb.train.evaluate(lambda p, x: x @ p, jnp.eye(3), jb.data.Dataset(x, y))
    with pytest.raises(TypeError, match=r"evaluate.ds.y must hold integer class labels, got dtype float32"):
        jb.train.evaluate(lambda p, x: x @ p, jnp.eye(3), jb.data.Dataset(x, np.zeros(4, np.float32)))


def test_half_precision_logits_are_reduced_in_float32():
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.normal(size=(64, 5)) * 4, jnp.bfloat16) for _ in range(2))
    s32, t32 = (np.asarray(a, np.float64) for a in (s, t))

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    want = 4 * np.mean(np.sum(np.exp(log_softmax(t32 / 2)) * (log_softmax(t32 / 2) - log_softmax(s32 / 2)), -1))
    np.testing.assert_allclose(float(jb.distill.kd_loss(s, t, 2.0)), want, rtol=1e-5)
    y = rng.integers(0, 5, 64)
    got = jb.train.evaluate(lambda p, x: x, None, jb.data.Dataset(s, y))["loss"]
    np.testing.assert_allclose(got, np.mean(-log_softmax(s32)[np.arange(64), y]), rtol=1e-5)


def test_weight_replacing_techniques_take_float_kernels_by_default_and_name_a_compressed_one_selected():
    w = jax.random.normal(jax.random.key(0), (16, 8))
    qarray = q.quantize(w, q.QuantSpec(bits=8))
    tree = {"q": {"kernel": qarray}, "ids": {"kernel": jnp.ones((3, 3), jnp.int32)}, "f": {"kernel": w.T}}
    calls = {"to quantize": lambda **kw: q.quantize_params(tree, q.QuantSpec(bits=8), **kw),
             "to cluster": lambda **kw: q.cluster(tree, 4, key=jax.random.key(1), **kw),
             "to factorize": lambda **kw: jb.lowrank.factorize_params(tree, rank=2, **kw)}
    for purpose, call in calls.items():
        out = call()
        assert out["q"]["kernel"] is qarray and out["ids"]["kernel"] is tree["ids"]["kernel"], purpose
        assert jb.leaves.is_compressed(out["f"]["kernel"]), purpose
        with pytest.raises(ValueError, match=rf"q/kernel is a compressed QArray .*{purpose}"):
            call(where="q/kernel")


def test_numpy_integers_count_as_ints_in_bit_allocation_and_pipelines():
    sens = {"a": {2: 1.0, 4: 0.1, 8: 0.0}, "b": {2: 0.5, 4: 0.05, 8: 0.0}}
    for budget in (10, 16, 40):  # sizes from np.prod(shape) are numpy ints: they are weights, not bytes
        want = q.allocate_bits(sens, {"a": 8, "b": 24}, budget)
        assert q.allocate_bits(sens, {"a": np.int64(8), "b": np.prod((4, 6))}, budget) == want, budget
    mesh = jax.make_mesh((4, 2), ("stage", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    w, x = jnp.stack([jnp.eye(3) * (s + 1) for s in range(4)]), jnp.ones((4, 3))
    run = lambda m: jb.parallel.pipeline(lambda w, h: h @ w, w, x, mesh=mesh, microbatches=m)
    np.testing.assert_array_equal(run(np.int64(2)), np.full((4, 3), 24.0))
    np.testing.assert_array_equal(run(jnp.int32(4)), run(2))
    with pytest.raises(TypeError, match="pipeline.microbatches must be an int, got True"):
        run(True)
