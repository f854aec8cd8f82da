import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt_big as jb
from test_leaves import Int8


def _direct(tree):
    leaves = jax.tree.leaves(tree)
    return sum(x.size for x in leaves), sum(x.nbytes for x in leaves), sum(int(np.count_nonzero(x)) for x in leaves)


def test_totals_equal_direct_count_linen():
    model = jb.models.CNN()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params = jax.tree.map(lambda x: jnp.where(jnp.abs(x) < 0.05, 0.0, x), params)
    totals = jb.report.summary(params).totals
    n, nbytes, nonzero = _direct(params)
    assert totals["params"] == n and totals["nbytes"] == nbytes
    assert abs(totals["nonzero"] - nonzero / n) < 1e-12
    assert totals["ratio"] == 1.0


def test_totals_equal_direct_count_nnx():
    state = nnx.state(jb.models.NnxCNN(rngs=nnx.Rngs(0)), nnx.Param)
    totals = jb.report.summary(state).totals
    n, nbytes, _ = _direct(state)
    assert totals["params"] == n and totals["nbytes"] == nbytes
    assert [r.path for r in jb.report.summary(state).rows][:2] == ["convs/0/bias", "convs/0/kernel"]


def test_compressed_leaf_reports_its_true_bytes():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    tree = {"d": {"kernel": Int8.of(w), "bias": jnp.zeros(32)}}
    report = jb.report.summary(tree)
    row = {r.path: r for r in report.rows}["d/kernel"]
    assert row.kind == "int8" and row.nbytes == 64 * 32 + 4 and row.dense_bytes == 64 * 32 * 4
    assert abs(row.ratio - 64 * 32 * 4 / (64 * 32 + 4)) < 1e-9
    assert report.totals["nbytes"] == 64 * 32 + 4 + 32 * 4


def test_text_and_markdown_tables_list_every_leaf():
    tree = {"a": {"kernel": jnp.ones((2, 3))}, "b": jnp.zeros(5)}
    report = jb.report.summary(tree)
    text, md = str(report), report.to_markdown()
    for path in ("a/kernel", "b", "total"):
        assert path in text and f"| {path} |" in md
    widths = {len(line) for line in text.splitlines()}
    assert len(widths) == 1  # aligned


def test_summary_counts_a_typed_key_by_its_key_data():
    keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
    rows = {r.path: r for r in jb.report.summary({"w": jnp.ones((2, 2)), "rng": keys}).rows}
    assert rows["rng"].nbytes == rows["rng"].dense_bytes == jax.random.key_data(keys).nbytes
    assert rows["rng"].dtype == "key<rbg>" and rows["rng"].params == 3 and rows["rng"].nonzero is None
    assert rows["w"].nbytes == 16 and rows["w"].nonzero == 1.0


def _bytes(tree):
    """Bytes of every leaf, a typed key counted by its raw data."""
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return sum((jax.random.key_data(x) if is_key(x) else x).nbytes for x in jax.tree.leaves(tree))


def test_summary_and_training_memory_of_a_prune_state_with_its_key():
    params = {"d": {"kernel": jnp.ones((8, 4))}}
    tx = jb.sparsity.prune(optax.adam(1e-3), sparsity=0.5)
    state = jb.train.TrainState.create(params, tx)
    assert jb.report.summary(state).totals["nbytes"] == _bytes(state)
    assert jb.report.training_memory(params, tx).opt_state == _bytes(tx.init(params))


def test_a_pruned_then_quantized_kernel_counts_its_zeros():
    key_mask, key_w = jax.random.split(jax.random.key(0))
    keep = np.asarray(jax.random.bernoulli(key_mask, 0.5, (16, 8)))
    big = np.asarray(jax.random.uniform(key_w, (16, 8), minval=0.5, maxval=1.0))   # no survivor rounds to 0
    params = {"d": {"kernel": jnp.asarray(np.where(keep, big, 0.0)), "bias": jnp.ones(8)}}
    recipe = jb.Recipe([jb.Rule("d/kernel", jb.Plan(quant=jb.quant.QuantSpec(bits=4)))])
    report = jb.report.summary(recipe.apply(params))
    row = {r.path: r for r in report.rows}["d/kernel"]
    assert row.kind.startswith("int4") and row.nonzero == keep.mean()
    assert report.totals["nonzero"] == (keep.sum() + 8) / (16 * 8 + 8)
    assert f"{keep.mean():.3f}" in str(report).splitlines()[3]


def test_summary_plan_is_the_deprecated_name_of_recipe():
    params = {"d": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
    recipe = jb.Recipe([jb.Rule("d/kernel", jb.Plan(quant=jb.quant.QuantSpec(bits=8)))])
    with pytest.warns(DeprecationWarning, match=r"summary\(plan=...\) is deprecated.*summary\(recipe=...\)"):
        old = jb.report.summary(params, plan=recipe)
    assert {r.path: r.planned for r in old.rows} == {"d/bias": None, "d/kernel": "rtn int8"}
    assert old == jb.report.summary(params, recipe=recipe)
    with pytest.raises(TypeError, match="plan= is its deprecated name"):
        jb.report.summary(params, recipe=recipe, plan=recipe)
