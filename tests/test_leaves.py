"""The compressed-leaf protocol, exercised with a small example type: an int8 array with a scale."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big import quant as q
from jaxopt_big import sparsity as sp


@flax.struct.dataclass
class Int8(jb.leaves.Compressed):
    values: jax.Array
    scale: jax.Array
    label: str = flax.struct.field(pytree_node=False, default="int8")  # a static field, as QArray.bits

    @classmethod
    def of(cls, x):
        scale = jnp.abs(x).max() / 127
        return cls(jnp.round(x / scale).astype(jnp.int8), scale)

    def dense(self):
        return self.values.astype(jnp.float32) * self.scale

    @property
    def nbytes(self):
        return self.values.nbytes + self.scale.nbytes

    @property
    def dense_shape(self):
        return self.values.shape

    @property
    def dense_dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def kind(self):
        return self.label


def _tree():
    w = jax.random.normal(jax.random.key(0), (16, 8))
    return {"Dense_0": {"kernel": Int8.of(w), "bias": jnp.ones(8)}}, w


def test_is_compressed_and_whole_leaf_paths():
    tree, _ = _tree()
    assert jb.leaves.is_compressed(tree["Dense_0"]["kernel"])
    assert not jb.leaves.is_compressed(tree["Dense_0"]["bias"])
    assert jb.tree.paths(tree) == ["Dense_0/bias", "Dense_0/kernel"]
    assert jb.tree.select(tree) == {"Dense_0": {"bias": False, "kernel": True}}


def test_densify_and_true_bytes():
    tree, w = _tree()
    dense = jb.leaves.densify(tree)
    np.testing.assert_allclose(dense["Dense_0"]["kernel"], w, atol=float(jnp.abs(w).max()) / 254 + 1e-6)
    assert jb.leaves.nbytes(tree) == 16 * 8 + 4 + 8 * 4
    d = tree["Dense_0"]["kernel"].describe()
    assert d.kind == "int8" and d.shape == (16, 8) and abs(d.bits - 8 * 132 / 128) < 1e-9


def test_compressed_leaf_jits_and_maps():
    tree, w = _tree()
    out = jax.jit(lambda t: jb.leaves.densify(t)["Dense_0"]["kernel"].sum())(tree)
    assert np.isclose(float(out), float(tree["Dense_0"]["kernel"].dense().sum()), rtol=1e-5)
    kinds = jb.leaves.map(lambda x: x.kind if jb.leaves.is_compressed(x) else "dense", tree)
    assert kinds == {"Dense_0": {"kernel": "int8", "bias": "dense"}}


def _mixed():
    w = jax.random.normal(jax.random.key(3), (8, 4))
    return {"a": {"kernel": q.quantize(w, q.QuantSpec())}, "b": {"kernel": w, "bias": jnp.ones(4)}}


def test_prune_and_rigl_leave_a_qarray_in_the_tree_alone():
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


def test_quantize_and_factorize_leave_other_compressed_leaves_alone():
    params = _mixed()
    out = q.quantize_params(params, q.QuantSpec(bits=4), where="b/kernel")
    assert out["a"]["kernel"] is params["a"]["kernel"] and out["b"]["kernel"].bits == 4
    low = jb.lowrank.factorize_params(params, rank=2, where="b/kernel")
    assert low["a"]["kernel"] is params["a"]["kernel"] and low["b"]["kernel"].v.shape == (2, 4)


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
