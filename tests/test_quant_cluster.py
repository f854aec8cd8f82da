"""Weight clustering: k-means, the Clustered leaf, centroid fine-tuning, digits end to end."""

import contextlib
import math

import digits_util as du
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big import quant as q
from jaxopt_big.quant import Clustered, cluster, codebooks, kmeans, with_codebooks
from jaxopt_big.tree import Rule


@hypothesis.settings(max_examples=20, deadline=None)
# k and n are shapes (each pair compiles k-means anew, ~1 s): drawn from sets spanning the range.
@hypothesis.given(k=st.sampled_from([2, 3, 7, 12]), n=st.sampled_from([20, 101, 300]), seed=st.integers(0, 1000))
def test_kmeans_objective_never_increases_and_ends_at_a_lloyd_fixed_point(k, n, seed):
    x = np.random.default_rng(seed).standard_t(3, n).astype(np.float32)
    res = kmeans(x, k, key=jax.random.key(seed), iters=15)
    obj = np.asarray(res.objective)
    assert obj.shape == (16,)
    assert np.all(np.diff(obj) <= 1e-6 * obj[:-1] + 1e-9), obj
    c, a = np.asarray(res.centroids), np.asarray(res.assignments)
    # The objective reported is the true sum of squared distances (numpy reference).
    np.testing.assert_allclose(obj[-1], ((x - c[a]) ** 2).sum(), rtol=1e-5)
    # Every value sits at its nearest centroid.
    np.testing.assert_allclose(np.abs(x - c[a]), np.abs(x[:, None] - c[None]).min(1), atol=1e-6)


def test_kmeans_recovers_separated_clusters_and_plus_plus_init_uses_the_key():
    rng = np.random.default_rng(0)
    centers = np.array([-10.0, 0.0, 7.0, 20.0])
    x = (centers[:, None] + 0.1 * rng.standard_normal((4, 50))).ravel().astype(np.float32)
    res = kmeans(x, 4, key=jax.random.key(3), iters=10)
    np.testing.assert_allclose(np.sort(np.asarray(res.centroids)), centers, atol=0.05)
    starts = {tuple(np.round(np.asarray(kmeans(x, 4, key=jax.random.key(s), iters=1).objective[:1]), 3))
              for s in range(4)}
    assert len(starts) > 1  # different keys, different k-means++ starts


def test_clustered_leaf_stores_codebook_plus_packed_indices():
    w = jax.random.normal(jax.random.key(0), (33, 7))
    tree = cluster({"d": {"kernel": w, "bias": jnp.zeros(7)}}, 8, key=jax.random.key(1))
    leaf = tree["d"]["kernel"]
    assert isinstance(leaf, Clustered) and leaf.bits == 3
    assert leaf.nbytes == 8 * 4 + math.ceil(33 * 7 * 3 / 8)
    assert jb.leaves.nbytes(tree) == leaf.nbytes + 7 * 4
    dense = np.asarray(leaf.dense())
    codebook = np.asarray(leaf.codebook)
    np.testing.assert_array_equal(dense, codebook[np.asarray(leaf.indices())])
    # Each weight went to its nearest centroid.
    np.testing.assert_allclose(np.abs(dense - np.asarray(w)),
                               np.abs(np.asarray(w)[..., None] - codebook).min(-1), atol=1e-6)
    # It is a pytree leaf for the library and jits.
    assert jb.tree.paths(tree) == ["d/bias", "d/kernel"]
    np.testing.assert_array_equal(jax.jit(lambda t: t["d"]["kernel"].dense())(tree), dense)


def test_cluster_rules_choose_k_per_layer_and_leave_others_dense():
    p = {"a": {"kernel": jnp.ones((4, 4)) * jnp.arange(4)}, "b": {"kernel": jnp.arange(12.0).reshape(3, 4)}}
    out = cluster(p, [Rule("a/.*", 2)], key=jax.random.key(0))
    assert out["a"]["kernel"].codebook.shape == (2,) and out["a"]["kernel"].bits == 1
    assert out["b"]["kernel"] is p["b"]["kernel"]


def test_centroid_gradient_is_the_sum_over_members():
    w = jax.random.normal(jax.random.key(0), (12, 5))
    x = jax.random.normal(jax.random.key(1), (3, 12))
    tree = cluster({"k": w}, 4, key=jax.random.key(2), where="k")

    def loss(weights):
        return jnp.sum(jnp.tanh(x @ weights) ** 2)

    got = jax.grad(lambda cb: loss(with_codebooks(tree, cb)["k"].dense()))(codebooks(tree))["k"]
    dense_grad = np.asarray(jax.grad(loss)(tree["k"].dense()))
    idx = np.asarray(tree["k"].indices())
    want = np.array([dense_grad[idx == c].sum() for c in range(4)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 0, 41])
def test_bad_cluster_counts_name_path_and_value(k):
    with pytest.raises(ValueError, match=rf"layer/kernel.*{k}"):
        cluster({"layer": {"kernel": jnp.ones((8, 5))}}, k, key=jax.random.key(0))


def test_eight_cluster_sharing_on_digits_within_one_point_after_codebook_finetuning(digits):
    _, apply, params, dense_acc = du.dense_cnn()
    train, test = digits
    clustered = cluster(params, 8, key=jax.random.key(0))
    assert all(isinstance(clustered[k]["kernel"], Clustered) for k in params)
    one_shot = du.accuracy(apply, jb.leaves.densify(clustered), test)
    # Fine-tune the centroids only; indices stay fixed (they are closed over, not trained).
    trained = du.fit(lambda cb, x: apply(jb.leaves.densify(with_codebooks(clustered, cb)), x),
                     codebooks(clustered), train, epochs=2, lr=3e-4)
    tuned = with_codebooks(clustered, trained)
    acc = du.accuracy(apply, jb.leaves.densify(tuned), test)
    np.testing.assert_array_equal(tuned["Dense_0"]["kernel"].packed, clustered["Dense_0"]["kernel"].packed)
    print(f"digits CNN: dense {dense_acc:.4f}, 8 clusters one-shot {one_shot:.4f}, fine-tuned {acc:.4f}, "
          f"bytes {jb.leaves.nbytes(tuned)} vs {jb.leaves.nbytes(params)}")
    assert acc >= dense_acc - 0.010
    assert jb.leaves.nbytes(tuned) < 0.12 * jb.leaves.nbytes(params)


@pytest.mark.parametrize("iters, error", [(-1, ValueError), (0, ValueError), (True, TypeError), (2.0, TypeError)])
def test_cluster_checks_iters_like_kmeans(iters, error):
    params = {"layer": {"kernel": jnp.ones((8, 5))}}
    with pytest.raises(error, match=rf"iters must be an int.*got {iters!r}"):
        cluster(params, 2, key=jax.random.key(0), iters=iters)
    with pytest.raises(error, match=rf"iters must be an int.*got {iters!r}"):
        kmeans(params["layer"]["kernel"], 2, key=jax.random.key(0), iters=iters)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_cluster_of_a_non_float_kernel_is_a_type_error_naming_it(dtype):
    params = {"layer": {"kernel": jnp.ones((8, 5), dtype)}}
    with pytest.raises(TypeError, match=f"layer/kernel: clustering needs a float kernel, got dtype {jnp.dtype(dtype)}"):
        cluster(params, 2, key=jax.random.key(0), where="layer/kernel")
    mixed = {**params, "dense": {"kernel": jnp.arange(40.0).reshape(8, 5)}}  # the default takes float kernels
    out = cluster(mixed, 2, key=jax.random.key(0))
    assert out["layer"]["kernel"] is params["layer"]["kernel"] and out["dense"]["kernel"].kind == "clustered k=2"
    with pytest.raises(TypeError, match="x: clustering needs a float kernel"):
        kmeans(params["layer"]["kernel"], 2, key=jax.random.key(0))


@pytest.mark.parametrize("with_mesh", [False, True])
def test_cluster_on_explicit_sharding_equals_unsharded(explicit_mesh, with_mesh):
    w = jax.random.normal(jax.random.key(4), (8, 16))
    params = {"d": {"kernel": jax.device_put(w, jax.NamedSharding(explicit_mesh, jax.P("data", "model")))}}
    key = jax.random.key(5)
    want = q.cluster({"d": {"kernel": w}}, 4, key=key)["d"]["kernel"]
    with jax.set_mesh(explicit_mesh) if with_mesh else contextlib.nullcontext():
        got = q.cluster(params, 4, key=key)["d"]["kernel"]
        dense = got.dense()
        jitted = jax.jit(lambda p: q.cluster(p, 4, key=key)["d"]["kernel"].dense())(params)
    np.testing.assert_array_equal(got.codebook, want.codebook)
    np.testing.assert_array_equal(got.indices(), want.indices())
    np.testing.assert_array_equal(dense, want.dense())
    np.testing.assert_array_equal(jitted, want.dense())
