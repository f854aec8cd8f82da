"""Regression tests of issue 16 (reliability): one test per defect class, each failing before its fix."""

import contextlib

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

MASK_CASES = [(scope, structure, 0.5) for scope in sp.Scope
              for structure in (sp.Unstructured(), sp.Block((2, 2)), sp.Channel(-1))] + [
    (sp.Scope.LAYER, sp.NM(2, 4), None)]


@pytest.mark.parametrize("with_mesh", [False, True])
@pytest.mark.parametrize("scope,structure,sparsity", MASK_CASES, ids=str)
def test_7_masks_on_explicit_sharding_equal_unsharded(with_mesh, scope, structure, sparsity):
    mesh = _explicit_mesh()
    w = jax.random.normal(jax.random.key(0), (8, 16))
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


@pytest.mark.parametrize("with_mesh", [False, True])
@pytest.mark.parametrize("size", [2, 4, 8])
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
