"""Truncated SVD factorization, its errors, report numbers, and factored execution (linen + nnx)."""

import contextlib
import re

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big import lowrank
from jaxopt_big.tree import Rule

SETTINGS = hypothesis.settings(max_examples=20, deadline=None)


def _matrix(seed: int, m: int, n: int, floor: float = 0.05) -> np.ndarray:
    """A random matrix with singular values spread in [floor, 1] (well conditioned for float32 checks)."""
    rng = np.random.default_rng(seed)
    q1, _ = np.linalg.qr(rng.normal(size=(m, m)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    s = np.sort(rng.uniform(floor, 1.0, k))[::-1]
    return (q1[:, :k] * s) @ q2[:k]


def _kept(w: np.ndarray) -> np.ndarray:
    s2 = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False) ** 2
    return np.cumsum(s2) / s2.sum()


@SETTINGS
@hypothesis.given(seed=st.integers(0, 10_000), m=st.integers(2, 24), n=st.integers(2, 24), frac=st.floats(0, 0.999))
def test_error_is_the_eckart_young_optimum(seed, m, n, frac):
    w = _matrix(seed, m, n)
    rank = 1 + int(frac * (min(m, n) - 1))
    lr = lowrank.factorize(jnp.asarray(w, jnp.float32), rank=rank)
    s = np.linalg.svd(w, compute_uv=False)
    optimum = np.sqrt((s[rank:] ** 2).sum())
    error = np.linalg.norm(w - np.asarray(lr.dense(), np.float64))
    assert lr.u.shape == (m, rank) and lr.v.shape == (rank, n)
    assert abs(error - optimum) <= 1e-4 * optimum  # optimum >= 0.05 by construction
    # singular values split evenly: both factors carry sqrt(s)
    np.testing.assert_allclose(np.linalg.norm(lr.u, axis=0), np.sqrt(s[:rank]), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(lr.v, axis=1), np.sqrt(s[:rank]), rtol=1e-4)


@SETTINGS
@hypothesis.given(seed=st.integers(0, 10_000), m=st.integers(2, 20), n=st.integers(2, 20),
                  energy=st.floats(0.01, 1.0))
def test_energy_picks_the_smallest_sufficient_rank(seed, m, n, energy):
    w = np.random.default_rng(seed).normal(size=(m, n))
    rank = lowrank.factorize(jnp.asarray(w, jnp.float32), energy=energy).rank
    kept = _kept(w)
    assert kept[rank - 1] >= energy - 1e-5
    assert rank == 1 or kept[rank - 2] < energy + 1e-5


@SETTINGS
@hypothesis.given(m=st.integers(1, 40), n=st.integers(1, 40), slack=st.floats(0, 3))
def test_max_params_is_never_exceeded_and_is_used(m, n, slack):
    budget = int((m + n) * (1 + slack * min(m, n)))
    lr = lowrank.factorize(np.ones((m, n), np.float32) + np.eye(m, n, dtype=np.float32), max_params=budget)
    assert lr.u.size + lr.v.size <= budget
    assert lr.rank == min(m, n) or (lr.rank + 1) * (m + n) > budget


def test_energy_one_keeps_everything_and_rank_full_is_exact():
    w = jnp.asarray(_matrix(1, 12, 7))
    assert lowrank.factorize(w, energy=1.0).rank == 7
    np.testing.assert_allclose(lowrank.factorize(w, rank=7).dense(), w, atol=1e-5)


def test_conv_kernel_hwio_factorizes_its_flattened_matrix():
    w = jnp.asarray(_matrix(2, 3 * 3 * 4, 8).reshape(3, 3, 4, 8), jnp.float32)
    lr = lowrank.factorize(w, rank=3)
    assert lr.u.shape == (3, 3, 4, 3) and lr.v.shape == (3, 8) and lr.shape == (3, 3, 4, 8)
    s = np.linalg.svd(np.asarray(w).reshape(36, 8), compute_uv=False)
    error = np.linalg.norm(np.asarray(w - lr.dense()))
    np.testing.assert_allclose(error, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)


def test_randomized_svd_is_near_optimal_on_low_rank_plus_noise():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k1, (300, 10)) @ jax.random.normal(k2, (10, 200)) + 0.1 * jax.random.normal(k3, (300, 200))
    lr = lowrank.factorize(w, rank=10, randomized=True, key=k4)
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    optimum = np.sqrt((s[10:] ** 2).sum())
    assert np.linalg.norm(np.asarray(w - lr.dense())) <= 1.02 * optimum
    # another key is as good; without power iterations and oversampling the sketch is far off (the knobs act)
    again = lowrank.factorize(w, rank=10, randomized=True, key=jax.random.key(1))
    assert np.linalg.norm(np.asarray(w - again.dense())) <= 1.02 * optimum
    crude = lowrank.factorize(w, rank=10, randomized=True, key=jax.random.key(1), power_iters=0, oversample=0)
    assert np.linalg.norm(np.asarray(w - crude.dense())) > 1.5 * optimum


def _params():
    return {"Dense_0": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)},
            "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}


@pytest.mark.parametrize("how, match", [
    ({"rank": 0}, r"rank must be an int >= 1, got 0"),
    ({"rank": 5}, r"Dense_0/kernel: rank=5 exceeds min\(m, n\)=4"),
    ({"energy": 0.0}, r"energy must be in \(0, 1\], got 0.0"),
    ({"energy": 1.2}, r"energy must be in \(0, 1\], got 1.2"),
    ({"max_params": 9}, r"Dense_0/kernel: max_params=9 allows no rank of a 6x4 matrix"),
    ({"rank": 1, "energy": 0.5}, r"exactly one of rank, energy, max_params"),
    ({"rank": 1, "randomized": True}, r"Dense_0/kernel: randomized=True needs an explicit PRNG key"),
])
def test_bad_options_name_the_leaf_path_and_value(how, match):
    with pytest.raises(ValueError, match=match) as e:
        lowrank.factorize_params(_params(), where="Dense_0/kernel", **how)
    assert "Dense_0/kernel" in str(e.value)


def test_a_selected_1d_leaf_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"Dense_1/bias: only kernels with ndim >= 2.*shape \(2,\)"):
        lowrank.factorize_params(_params(), where=["Dense_0/kernel", "Dense_1/bias"], rank=1)


def test_rules_give_per_leaf_options_and_none_keeps_dense():
    params = {"a": {"kernel": jnp.asarray(_matrix(0, 8, 8))}, "b": {"kernel": jnp.asarray(_matrix(1, 8, 6))},
              "c": {"kernel": jnp.ones((5, 5))}}
    out = lowrank.factorize_params(params, [Rule("a/kernel", {"rank": 2}), Rule("b/kernel", {"energy": 1.0}),
                                            Rule("c/.*", None)], rank=3)
    assert out["a"]["kernel"].rank == 2 and out["b"]["kernel"].rank == 6
    assert out["c"]["kernel"] is params["c"]["kernel"]
    with pytest.raises(ValueError, match="matches no leaf"):
        lowrank.factorize_params(params, [Rule("nope/kernel", {"rank": 1})])
    with pytest.raises(ValueError, match=r"b/kernel: rank=7 exceeds"):
        lowrank.factorize_params(params, [Rule("b/kernel", {"rank": 7})])


def test_report_counts_true_bytes_and_flops():
    lr = lowrank.factorize_params({"Dense_0": {"kernel": jnp.asarray(_matrix(0, 64, 32), jnp.float32)}}, rank=4)
    row = jb.report.summary(lr).rows[0]
    assert row.nbytes == 4 * 4 * (64 + 32) and row.dense_bytes == 4 * 64 * 32
    assert row.flops == 2 * 4 * (64 + 32) and row.kind == "lowrank r=4"


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME")(x))
        x = nn.relu(nn.Conv(6, (3, 3), padding="VALID", use_bias=False)(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def _no_intermediate_of_shape(fn, shape, *args):
    """True if no equation of ``fn``'s jaxpr (recursively) produces an array of ``shape``."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if any(getattr(v.aval, "shape", None) == shape for v in eqn.outvars):
                return False
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                if not walk(sub):
                    return False
        return True
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_linen_factored_forward_equals_densified_and_never_builds_the_kernel():
    x = jax.random.normal(jax.random.key(1), (4, 9, 9, 3))
    params = _Net().init(jax.random.key(0), x)["params"]
    low = lowrank.factorize_params(params, rank=2)
    run = jax.jit(lowrank.apply(_Net().apply))
    dense_out = _Net().apply({"params": lowrank.densify(low)}, x)
    np.testing.assert_allclose(run({"params": low}, x), dense_out, atol=1e-5, rtol=1e-5)
    assert not np.allclose(dense_out, _Net().apply({"params": params}, x), atol=1e-3)  # rank 2 changed it
    for shape in [(3, 3, 3, 8), (3, 3, 8, 6), params["Dense_0"]["kernel"].shape]:
        assert _no_intermediate_of_shape(run, shape, {"params": low}, x), shape


def test_nnx_factored_forward_equals_densified():
    model = jb.models.NnxCNN(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    low = lowrank.factorize_params(nnx.state(model, nnx.Param), rank=3)
    nnx.update(model, lowrank.densify(low))
    expected = model(x)
    nnx.update(model, low)
    assert isinstance(model.hidden.kernel.get_value(), lowrank.LowRank)
    np.testing.assert_allclose(lowrank.apply(model)(x), expected, atol=1e-5, rtol=1e-5)


def test_factors_are_trained_by_optax():
    x = jax.random.normal(jax.random.key(1), (32, 9, 9, 3))
    y = jnp.arange(32) % 5
    params = lowrank.factorize_params(_Net().init(jax.random.key(0), x)["params"], rank=2)
    loss_fn = jb.train.classifier_loss(lambda p, x: lowrank.apply(_Net().apply)({"params": p}, x))
    tx = optax.adam(1e-2)
    step = jb.train.make_step(loss_fn, tx, donate=False)
    state = jb.train.TrainState.create(params, tx)
    first = None
    for _ in range(20):
        state, metrics = step(state, (x, y))
        first = first if first is not None else float(metrics["loss"])
    kernel = state.params["Conv_0"]["kernel"]
    assert isinstance(kernel, lowrank.LowRank) and kernel.u.shape == (3, 3, 3, 2)
    assert not np.allclose(kernel.v, params["Conv_0"]["kernel"].v)
    assert float(metrics["loss"]) < 0.5 * first


def test_energy_on_empty_and_all_zero_kernels():
    for shape in [(0, 4), (4, 0)]:
        for how in [{"energy": 0.9}, {"rank": 1}, {"max_params": 100}]:
            match = re.escape(f"d/kernel: cannot factorize a zero-size kernel (shape {shape})")
            with pytest.raises(ValueError, match=match):
                lowrank.factorize_params({"d": {"kernel": jnp.zeros(shape)}}, **how)
    lr = lowrank.factorize(jnp.zeros((6, 4)), energy=0.5)  # all of no energy is kept by rank 1
    assert lr.rank == 1 and lr.nbytes < 6 * 4 * 4
    np.testing.assert_array_equal(lr.dense(), np.zeros((6, 4)))


@pytest.mark.parametrize("bad", ["no", 1, None, np.float32(0)])
def test_randomized_must_be_a_bool(bad):
    with pytest.raises(TypeError, match=re.escape(f"Dense_0/kernel: randomized must be a bool, got {bad!r}")):
        lowrank.factorize_params(_params(), where="Dense_0/kernel", rank=1, randomized=bad, key=jax.random.key(0))
    with pytest.raises(TypeError, match="randomized must be a bool"):
        lowrank.factorize(jnp.ones((4, 4)), rank=1, randomized=bad, key=jax.random.key(0))


def test_traced_non_finite_factorize_gives_nan_factors_only_for_that_leaf():
    w = jax.random.normal(jax.random.key(0), (8, 4))
    params = {"a": {"kernel": w.at[0, 0].set(jnp.inf)}, "b": {"kernel": w}}
    out = jax.jit(lambda p: jb.lowrank.factorize_params(p, rank=2))(params)
    assert np.isnan(np.asarray(out["a"]["kernel"].dense())).all()
    np.testing.assert_allclose(out["b"]["kernel"].dense(), jb.lowrank.factorize(w, rank=2).dense(), rtol=1e-5, atol=1e-6)


FACTORIZE_CASES = [{"rank": 3}, {"energy": 0.9}, {"rank": 3, "randomized": True, "key": jax.random.key(0)}]


@pytest.mark.parametrize("with_mesh", [False, True])
@pytest.mark.parametrize("how", FACTORIZE_CASES, ids=lambda how: "-".join(how))
def test_factorize_on_explicit_sharding_equals_unsharded(explicit_mesh, with_mesh, how):
    w = jax.random.normal(jax.random.key(3), (8, 16))
    params = {"d": {"kernel": jax.device_put(w, jax.NamedSharding(explicit_mesh, jax.P("data", "model"))), "bias": jnp.zeros(16)}}
    want = jb.lowrank.factorize_params({"d": {"kernel": w, "bias": jnp.zeros(16)}}, **how)["d"]["kernel"]
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        got = jb.lowrank.factorize_params(params, **how)["d"]["kernel"]
        dense = got.dense()  # u @ v contracts under the explicit_mesh
        if "energy" not in how:  # energy= picks the rank on the host: not jittable
            jitted = jax.jit(lambda w: jb.lowrank.factorize(w, **how))(params["d"]["kernel"])
            np.testing.assert_array_equal(jitted.v, jb.lowrank.factorize(w, **how).v)
    np.testing.assert_array_equal(got.u, want.u)
    np.testing.assert_array_equal(got.v, want.v)
    np.testing.assert_allclose(dense, want.dense(), atol=1e-6)
    # u keeps the kernel's rows, v its columns; the rank axis both contract is whole
    assert (got.u.sharding.spec, got.v.sharding.spec) == (jax.P("data", None), jax.P(None, "model"))
