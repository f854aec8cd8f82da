"""Contract tests over every compressed-leaf kind of the library: one factory per kind, the same checks.

Each kind must: densify to an independent numpy reference, count as ``nbytes`` exactly the arrays a
checkpoint writes for it, flatten and unflatten through ``jit``, survive an Orbax round trip, give
a report row that agrees with it, and keep the sharding of the parameter it was made from.
A new ``jb.leaves.Compressed`` subclass in the library without a factory here fails
``test_every_kind_has_a_factory``.
"""

import importlib
import pkgutil

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big.quant import PER_CHANNEL, QuantSpec

for _m in pkgutil.walk_packages(jb.__path__, "jaxopt_big."):  # every kind the library defines is registered
    importlib.import_module(_m.name)

SHAPE = (64, 32)


def _pruned(w):
    return jnp.where(jnp.abs(w) > 1.0, w, 0.0)


def _np_int(w, bits):
    """Symmetric per-output-channel absmax grid, in numpy."""
    w = np.asarray(w, np.float64)
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(w).max(0, keepdims=True) / qmax
    return np.clip(np.round(w / s), -qmax - 1, qmax) * s


def _np_ternary(w):
    w = np.asarray(w, np.float64)
    keep = np.abs(w) > 0.7 * np.abs(w).mean(0, keepdims=True)
    a = (np.abs(w) * keep).sum(0, keepdims=True) / np.maximum(keep.sum(0, keepdims=True), 1)
    return np.sign(w) * keep * a


def _np_float8(w):
    w = np.asarray(w, np.float32)
    s = np.abs(w).max() / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    return (w / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s


def _np_svd(w, r):
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _lora(w):
    leaf = jb.lowrank.lora_init({"kernel": w}, jax.random.key(6), rank=2, alpha=4.0)["kernel"]
    return leaf.replace(b=leaf.b + jax.random.normal(jax.random.key(7), leaf.b.shape))  # as after training


def _check_clustered(w, leaf, dense):
    codebook = np.asarray(leaf.codebook)
    assert np.isin(dense, codebook).all()  # every weight is a centroid
    assert np.linalg.norm(dense - w) < 0.25 * np.linalg.norm(w)  # 8 centroids of a gaussian: ~0.19


# kind, factory(dense kernel) -> leaf, check(w, leaf, dense) against an independent reference
FACTORIES = {
    "QArray-int4": (jb.quant.QArray, lambda w: jb.quant.quantize(w, QuantSpec(bits=4, granularity=PER_CHANNEL)),
                    lambda w, leaf, d: np.testing.assert_allclose(d, _np_int(w, 4), rtol=1e-5, atol=1e-6)),
    "DecodeArray-int4": (jb.quant.DecodeArray, lambda w: jb.quant.decode_layout(jb.quant.quantize(
                         w, QuantSpec(bits=4, granularity=PER_CHANNEL))),
                         lambda w, leaf, d: np.testing.assert_allclose(d, _np_int(w, 4), rtol=1e-5, atol=1e-6)),
    "QArray-int8-sparse-codes": (
        jb.quant.QArray,
        lambda w: jb.sparsity.pack_array(jb.quant.quantize(_pruned(w), QuantSpec(bits=8, granularity=PER_CHANNEL))),
        lambda w, leaf, d: np.testing.assert_allclose(d, _np_int(_pruned(w), 8), rtol=1e-5, atol=1e-6)),
    "SubByteArray": (jb.quant.SubByteArray, lambda w: jb.quant.Ternary().quantize(w),
                     lambda w, leaf, d: np.testing.assert_allclose(d, _np_ternary(w), rtol=1e-5, atol=1e-6)),
    "Float8Array": (jb.quant.Float8Array, lambda w: jb.quant.Float8().quantize(w),
                    lambda w, leaf, d: np.testing.assert_allclose(d, _np_float8(w), rtol=1e-6, atol=1e-7)),
    "Learned": (jb.quant.Learned, lambda w: jb.quant.lsq({"kernel": w}, QuantSpec(bits=4))["kernel"],
                lambda w, leaf, d: np.testing.assert_allclose(
                    d, np.clip(np.round(np.asarray(w) / np.asarray(leaf.scale)), -8, 7) * np.asarray(leaf.scale),
                    rtol=1e-5, atol=1e-6)),
    "Clustered": (jb.quant.Clustered, lambda w: jb.quant.cluster({"kernel": w}, 8, key=jax.random.key(4))["kernel"],
                  _check_clustered),
    "PackedSparse": (jb.sparsity.PackedSparse, lambda w: jb.sparsity.pack_array(_pruned(w)),
                     lambda w, leaf, d: np.testing.assert_array_equal(d, np.asarray(_pruned(w)))),
    "LowRank": (jb.lowrank.LowRank, lambda w: jb.lowrank.factorize(w, rank=4),
                lambda w, leaf, d: np.testing.assert_allclose(d, _np_svd(w, 4), atol=1e-4)),
    "LoRA": (jb.lowrank.LoRA, _lora,
             lambda w, leaf, d: np.testing.assert_allclose(
                 d, np.asarray(w) + leaf.scale * np.asarray(leaf.a) @ np.asarray(leaf.b), rtol=1e-5, atol=1e-5)),
}
NAMES = sorted(FACTORIES)


def _w():
    return jax.random.normal(jax.random.key(0), SHAPE)


def _kinds(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _kinds(sub)


def test_every_kind_has_a_factory():
    library = {k for k in _kinds(jb.leaves.Compressed) if k.__module__.startswith("jaxopt_big.")}
    assert library == {kind for kind, _, _ in FACTORIES.values()}


@pytest.mark.parametrize("name", NAMES)
def test_dense_round_trip_and_declared_fields(name):
    kind, make, check = FACTORIES[name]
    w = _w()
    leaf = make(w)
    assert type(leaf) is kind
    dense = leaf.dense()
    assert dense.shape == leaf.shape == tuple(leaf.dense_shape) == SHAPE
    assert dense.dtype == leaf.dtype == np.dtype(leaf.dense_dtype) == w.dtype
    assert leaf.size == w.size and leaf.ndim == 2
    check(np.asarray(w), leaf, np.asarray(dense))


def _saved(tmp_path, tree):
    """Saves and restores ``tree``; returns the bytes of the checkpoint's array data files and the restored tree."""
    with jb.checkpoint.Manager(tmp_path, async_save=False) as mgr:
        mgr.save(0, tree)
        back = mgr.restore(0, like=jb.checkpoint.abstract(tree))
    data = sum(f.stat().st_size for f in mgr.step_directory(0).glob("state/ocdbt.process_*/d/*"))
    return data, back


@pytest.mark.parametrize("name", NAMES)
def test_nbytes_is_what_the_checkpoint_writes(name, tmp_path):
    _, make, _ = FACTORIES[name]
    # Big enough that the checkpoint's metadata nodes (a few hundred bytes each, and how many ocdbt writes
    # depends on timing) stay far below the 5% tolerance.
    leaf = make(jax.random.normal(jax.random.key(0), (1024, 512)))
    disk, back = _saved(tmp_path / "leaf", {"kernel": leaf})
    written = sum(x.nbytes for x in jax.tree.leaves(back))  # the arrays the checkpoint holds for the leaf
    assert leaf.nbytes == written
    # On disk the leaf takes what its arrays alone take (the same zstd-compressed data, within 5%):
    # no dense copy, nothing but its parts. (zstd makes both smaller than nbytes, hence the comparison.)
    parts = {f"a{i}": x for i, x in enumerate(jax.tree.leaves(leaf))}
    disk_parts, _ = _saved(tmp_path / "parts", parts)
    assert abs(disk - disk_parts) <= 0.05 * disk_parts, (disk, disk_parts)


@pytest.mark.parametrize("name", NAMES)
def test_flatten_unflatten_under_jit(name):
    _, make, _ = FACTORIES[name]
    leaf = make(_w())
    arrays, treedef = jax.tree.flatten(leaf)
    chex.assert_trees_all_equal(jax.tree.unflatten(treedef, arrays), leaf)
    out = jax.jit(lambda t: jax.tree.map(lambda a: a, t))(leaf)
    assert jax.tree.structure(out) == treedef  # static fields (bits, shapes, scale...) came through
    chex.assert_trees_all_equal(out, leaf)
    np.testing.assert_allclose(jax.jit(lambda t: t.dense())(leaf), leaf.dense(), rtol=1e-6, atol=1e-7)
    tree = {"layer": {"kernel": leaf, "bias": jnp.ones(SHAPE[-1])}}
    assert jb.tree.paths(tree) == ["layer/bias", "layer/kernel"]  # one leaf, not its parts


@pytest.mark.parametrize("name", NAMES)
def test_orbax_round_trip(name, tmp_path):
    _, make, _ = FACTORIES[name]
    leaf = make(_w())
    state = jb.train.TrainState.create({"kernel": leaf}, optax.identity())
    _, back = _saved(tmp_path, state)
    restored = back.params["kernel"]
    assert type(restored) is type(leaf) and jax.tree.structure(restored) == jax.tree.structure(leaf)
    chex.assert_trees_all_equal(restored, leaf)
    np.testing.assert_array_equal(restored.dense(), leaf.dense())


@pytest.mark.parametrize("name", NAMES)
def test_report_row(name):
    _, make, _ = FACTORIES[name]
    leaf = make(_w())
    (row,) = jb.report.summary({"layer": {"kernel": leaf}}).rows
    assert (row.path, row.kind, row.shape, row.params) == ("layer/kernel", leaf.kind, SHAPE, leaf.size)
    assert row.nbytes == leaf.nbytes and row.dense_bytes == leaf.size * 4
    assert row.bits == pytest.approx(8 * leaf.nbytes / leaf.size)
    assert row.ratio == pytest.approx(leaf.size * 4 / leaf.nbytes)


@pytest.mark.parametrize("name", NAMES)
def test_sharding_of_the_parameter_is_kept_on_8_devices(name):
    _, make, _ = FACTORIES[name]
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))  # as jb.parallel.make_mesh
    w = jax.device_put(_w(), jax.NamedSharding(mesh, jax.P(None, "x")))
    leaf = make(w)
    for x in jax.tree.leaves(leaf):
        assert isinstance(x.sharding, jax.NamedSharding) and x.sharding.mesh == mesh, (x.shape, x.sharding)
        if x.ndim == 2 and x.shape[1] == SHAPE[1]:  # spans the sharded output axis: still split over it
            assert x.sharding.spec[1] == "x", (x.shape, x.sharding.spec)
    out = jax.jit(lambda t: t)(leaf)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(leaf)):
        assert a.sharding.is_equivalent_to(b.sharding, b.ndim), (a.sharding, b.sharding)
