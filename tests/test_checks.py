"""The shared argument checks (jaxopt_big/_checks.py) and the options and errors built on them:
numbers in every scalar form, bools / NaN / Inf refused, errors that name the leaf."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big import _checks
from jaxopt_big import quant as q
from jaxopt_big import sparsity as sp

BAD = [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)]


@pytest.mark.parametrize("name,bad", BAD)
def test_non_finite_weights_raise_eagerly_naming_the_leaf(name, bad):
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


@pytest.mark.parametrize("n, sparsity", [(1, 2 / 3), (1, np.float32(2 / 3)), (2, 1 / 3), (2, jnp.float32(1 / 3))])
def test_numpy_scalar_options_are_taken_as_written(n, sparsity):
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
def test_options_reject_bools_nan_and_inf(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_zero_size_kernels_and_packing_compressed_leaves_raise_naming_the_leaf():
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


FORMS = [lambda v: v, np.float32, np.float64, lambda v: np.asarray(v, np.float32), lambda v: jnp.asarray(v, jnp.float32)]


INT_FORMS = [lambda v: v, np.int8, np.int64, lambda v: np.asarray(v), lambda v: jnp.asarray(v, jnp.int32)]


@hypothesis.given(v=st.floats(allow_nan=True, allow_infinity=True, width=32), form=st.sampled_from(FORMS),
                  closed=st.booleans())
@hypothesis.settings(max_examples=60, deadline=None)
def test_fraction_accepts_every_scalar_form_exactly_in_range(v, form, closed):
    inside = 0 <= v < 1 or (closed and v == 1)
    if inside:
        assert _checks.fraction("s", form(v), closed=closed) == v
        assert isinstance(_checks.fraction("s", form(v), closed=closed), float)
    else:
        with pytest.raises(ValueError, match=r"s must be in \[0, 1[)\]], got"):
            _checks.fraction("s", form(v), closed=closed)


@hypothesis.given(v=st.integers(-300, 300), form=st.sampled_from(INT_FORMS), low=st.integers(-5, 5))
@hypothesis.settings(max_examples=60, deadline=None)
def test_integer_accepts_every_int_form_and_bounds(v, form, low):
    v = int(np.int8(np.clip(v, -128, 127)))
    if v >= low:
        assert _checks.integer("n", form(v), low=low) == v and type(_checks.integer("n", form(v))) is int
    else:
        with pytest.raises(ValueError, match=rf"n must be an int >= {low}, got"):
            _checks.integer("n", form(v), low=low)


@pytest.mark.parametrize("bad", [True, np.bool_(False), jnp.asarray(True), "1", None, [1], 1.5, np.float32(2.0)])
def test_integer_rejects_bools_strings_and_floats(bad):
    with pytest.raises(TypeError, match="n must be an int"):
        _checks.integer("n", bad)


@hypothesis.given(v=st.floats(allow_nan=True, allow_infinity=True), allow_inf=st.booleans())
@hypothesis.settings(max_examples=60, deadline=None)
def test_number_rejects_nan_always_and_inf_unless_allowed(v, allow_inf):
    ok = not np.isnan(v) and (allow_inf or np.isfinite(v)) and v > 0
    if ok:
        assert _checks.number("t", v, above=0, allow_inf=allow_inf) == v
    else:
        with pytest.raises(ValueError, match=r"t must be a (finite )?number > 0, got"):
            _checks.number("t", v, above=0, allow_inf=allow_inf)
    with pytest.raises(TypeError, match="t must be a number"):
        _checks.number("t", bool(v == v))


def test_traced_values_pass_only_where_allowed():
    assert jax.jit(lambda s: _checks.fraction("s", s, traced=True) * 2)(0.25) == 0.5
    with pytest.raises(TypeError, match="s must be a concrete number"):
        jax.jit(lambda s: _checks.fraction("s", s))(0.25)
    _checks.finite([("a", jnp.ones(2)), ("i", jnp.arange(3)), ("e", jnp.zeros(0))])
    jax.jit(lambda x: _checks.finite([("a", x)]) or x)(jnp.array([jnp.nan]))  # traced: not inspected
    with pytest.raises(ValueError, match=r"b: w contain NaN or Inf \(2 of 3 values\)"):
        _checks.finite([("a", jnp.ones(2)), ("b", np.array([np.inf, 1.0, np.nan]))], "w")


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


def test_oneshot_with_a_jax_scalar_sparsity_equals_the_python_number(tiny_llama):
    model = tiny_llama
    cal = [jax.random.randint(jax.random.key(0), (2, 8), 0, 64)]
    masks = []
    for s in (0.5, jnp.float32(0.5)):
        out, _ = jb.oneshot.compress(model, None, cal, jb.Recipe([jb.Rule(r"layers/.*", jb.Plan(sparsity=jb.Wanda(s)))]),
                                     progress=False)
        masks.append(jax.tree.map(lambda x: np.asarray(x) != 0, jb.leaves.densify(out)))
    jax.tree.map(np.testing.assert_array_equal, masks[0], masks[1])


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
