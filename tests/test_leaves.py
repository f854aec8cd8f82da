"""The compressed-leaf protocol, exercised with a small example type: an int8 array with a scale."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import jaxopt_big as jb


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
