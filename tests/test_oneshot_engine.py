"""The block-wise one-shot engine: equality with the per-layer solvers on numpy statistics, every
method, linen/nnx/scanned (nnx.scan and nn.scan)/DenseGeneral/Einsum models, meshes, and loud errors on bad input."""

import contextlib
import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big.oneshot import _engine, _solve
from jaxopt_big.quant import gptq_kernel
from jaxopt_big.sparsity import NM, sparsegpt_kernel, wanda_kernel
from jaxopt_big.tree import Rule

D = 8
INT4 = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(4))
INT3 = jb.quant.QuantSpec(bits=3, symmetric=False, granularity=jb.quant.PER_CHANNEL)


class Res(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="dense")(x)


class Chain(nn.Module):
    depth: int = 5

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = Res(name=f"layer_{i}")(x)
        return x


class MLP(nn.Module):
    hidden: int = D

    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(x.shape[-1], name="down")(jax.nn.relu(nn.Dense(self.hidden, name="up")(x)))


class MLPNet(nn.Module):
    layers: int = 2
    hidden: int = D

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = MLP(self.hidden, name=f"layer_{i}")(x)
        return x


def _data(rows=32, key=0):
    return np.asarray(jax.random.normal(jax.random.key(key), (rows, D)) * jnp.linspace(0.2, 2.0, D))


def _hessian(x):
    x = np.asarray(x, np.float64)
    return np.asarray(x.T @ x, np.float32)


def _codes(leaf):
    return np.asarray(leaf.int_values())


# one rule per block: every method, each fed by the compressed outputs of the blocks before it
# (the joint one first: its masks and zero points are the most sensitive to float noise in the inputs)
PLANS = [jb.Plan(sparsity=jb.SparseGPT(0.5), quant=jb.GPTQ(INT3)), jb.Plan(quant=jb.GPTQ(INT4, act_order=True)),
         jb.Plan(sparsity=jb.SparseGPT(0.5, block_size=4)), jb.Plan(sparsity=jb.Wanda(NM(2, 4))),
         jb.Plan(sparsity=jb.Magnitude(0.5))]


def _reference(w, h, plan):
    """The library's per-layer solvers called directly on a numpy Hessian."""
    pruner, quantizer = plan.pruner, plan.quantizer
    if isinstance(pruner, jb.Magnitude):
        keep = np.abs(w) > np.median(np.abs(w))
        w = np.where(keep, w, 0.0)
    elif isinstance(pruner, jb.Wanda):
        w = wanda_kernel(w, np.sqrt(np.diag(h)), structure=pruner.sparsity)
    elif isinstance(pruner, jb.SparseGPT):
        w = sparsegpt_kernel(w, h, pruner.sparsity, block_size=pruner.block_size)
    if quantizer is not None:
        pruned = None if pruner is None else np.asarray(w) == 0
        return gptq_kernel(w, h, quantizer.spec, act_order=quantizer.act_order, pruned=pruned)
    return np.asarray(w)


@pytest.fixture(scope="module")
def chain():
    x = _data()
    params = Chain().init(jax.random.key(1), x)["params"]
    recipe = jb.Recipe([Rule(f"layer_{i}/dense", plan) for i, plan in enumerate(PLANS)])
    out, report = jb.oneshot.compress(Chain(), params, [x[:16], x[16:]], recipe, progress=False)
    return x, params, out, report


def test_each_block_equals_its_solver_on_numpy_statistics_of_compressed_inputs(chain):
    x, params, out, _ = chain
    h = x
    for i, plan in enumerate(PLANS):
        layer = params[f"layer_{i}"]["dense"]
        ref = _reference(np.asarray(layer["kernel"]), _hessian(h), plan)
        got = out[f"layer_{i}"]["dense"]["kernel"]
        if plan.quantizer is None:
            np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(got) == 0, ref == 0)
            dense = np.asarray(got)
        else:
            assert np.mean(_codes(got) == _codes(ref)) >= 0.99
            dense = np.asarray(got.dense())
        h = h + h @ dense + np.asarray(layer["bias"])   # the next block sees the compressed output
    assert out["layer_4"]["dense"]["bias"] is params["layer_4"]["dense"]["bias"]


class Ordered(nn.Module):  # two residual blocks, called in the order given (a block may be called twice)
    order: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        layers = [Res(name=f"layer_{i}") for i in range(2)]
        for i in self.order:
            x = layers[i](x)
        return x


def test_blocks_are_compressed_in_the_order_the_model_calls_them():
    # the engine took blocks in module order: layer_1, called first, was solved on layer_0's output
    x = _data()
    params = Ordered((1, 0)).init(jax.random.key(1), x)["params"]
    plan = jb.Plan(sparsity=jb.SparseGPT(0.5))
    out, report = jb.oneshot.compress(Ordered((1, 0)), params, [x], jb.Recipe([Rule(".*", plan)]), progress=False)
    assert [r.path for r in report.rows] == ["layer_1/dense", "layer_0/dense"]
    h = x
    for i in (1, 0):
        layer = params[f"layer_{i}"]["dense"]
        ref = _reference(np.asarray(layer["kernel"]), _hessian(h), plan)
        np.testing.assert_allclose(np.asarray(out[f"layer_{i}"]["dense"]["kernel"]), ref, atol=1e-5)
        h = h + h @ ref + np.asarray(layer["bias"])


def test_a_block_called_twice_is_refused_naming_its_calls():
    # it was calibrated on its first call only, and the block after it on the wrong input
    x = _data(8)
    params = Ordered((0, 1, 0)).init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match=r"^layer_0: the model calls this block 2 times \(block calls in order: "
                                         r"\['layer_0', 'layer_1', 'layer_0'\]\)"):
        jb.oneshot.compress(Ordered((0, 1, 0)), params, [x], jb.Recipe([Rule(".*", jb.Plan(sparsity=0.5))]),
                            progress=False)


def test_sparsegpt_then_gptq_keeps_the_pruned_weights_at_zero(chain):
    _, params, out, _ = chain
    q = out["layer_0"]["dense"]["kernel"]
    assert isinstance(q, jb.quant.QArray) and q.bits == 3
    zeros = np.asarray(q.dense()) == 0
    assert zeros.mean() >= 0.5   # the 50% pruned stay exactly zero after quantizing the survivors


def test_report_lists_every_layer_with_its_output_error(chain):
    x, params, out, report = chain
    assert [r.path for r in report.rows] == [f"layer_{i}/dense" for i in range(5)]
    assert report.blocks == 5 and report.block_passes == 2.0
    # the error of the first layer, recomputed from its definition on the calibration rows
    w, new = np.asarray(params["layer_0"]["dense"]["kernel"]), np.asarray(out["layer_0"]["dense"]["kernel"].dense())
    expected = np.sum((x @ (new - w)) ** 2) / np.sum((x @ w) ** 2)
    assert report.rows[0].error == pytest.approx(expected, rel=1e-3)
    assert report.rows[2].sparsity == pytest.approx(0.5)
    assert "layer_3/dense" in str(report) and "gptq int4 g4" in report.to_markdown()


@pytest.mark.parametrize("blocks", [None, r"layer_\d+"])
def test_blocks_run_in_numeric_order_past_ten(blocks):
    """layer_10 follows layer_9 (not layer_1, as string order has it): each block is pruned on the
    outputs of the pruned block before it (numpy Wanda: keep the top half of |w| x input norm)."""
    depth, x = 12, _data()
    params = Chain(depth).init(jax.random.key(3), x)["params"]
    recipe = jb.Recipe([Rule(r"layer_\d+/dense", jb.Plan(sparsity=jb.Wanda(0.5)))])
    out, report = jb.oneshot.compress(Chain(depth), params, [x], recipe, blocks=blocks, progress=False)
    assert [r.path for r in report.rows] == [f"layer_{i}/dense" for i in range(depth)]
    h = np.asarray(x, np.float64)
    for i in range(depth):
        layer = params[f"layer_{i}"]["dense"]
        w = np.asarray(layer["kernel"], np.float64)
        score = np.abs(w) * np.linalg.norm(h, axis=0)[:, None]
        keep = score > np.median(score, axis=0)  # 4 of the 8 inputs of each output
        got = np.asarray(out[f"layer_{i}"]["dense"]["kernel"])
        np.testing.assert_array_equal(got != 0, keep, err_msg=f"layer_{i}")
        h = h + h @ np.where(keep, w, 0.0) + np.asarray(layer["bias"])


@pytest.mark.parametrize("sequential", [False, True])
def test_later_layers_of_a_block_see_the_compressed_earlier_ones_only_when_sequential(sequential):
    x = _data()
    params = MLPNet().init(jax.random.key(2), x)["params"]
    plan = jb.Plan(quant=jb.GPTQ(INT3))
    out, report = jb.oneshot.compress(MLPNet(), params, [x], jb.Recipe([Rule(".*", plan)]), progress=False,
                                      sequential=sequential)
    p = params["layer_0"]
    up = _reference(np.asarray(p["up"]["kernel"]), _hessian(x), plan)
    np.testing.assert_array_equal(_codes(out["layer_0"]["up"]["kernel"]), _codes(up))
    up_used = np.asarray(up.dense()) if sequential else np.asarray(p["up"]["kernel"])
    hidden = np.maximum(x @ up_used + np.asarray(p["up"]["bias"]), 0)
    down = _reference(np.asarray(p["down"]["kernel"]), _hessian(hidden), plan)
    assert np.mean(_codes(out["layer_0"]["down"]["kernel"]) == _codes(down)) >= 0.99
    assert report.block_passes == (3.0 if sequential else 2.0)   # one run per group of layers, then outputs


# ------------------------------------------------------------------ generality

def test_bert_q_k_v_share_one_hessian_and_padding_stays_out():
    config = jb.zoo.BertConfig(vocab_size=30, hidden=16, layers=2, heads=2, intermediate=32, max_positions=8)
    ids = jax.random.randint(jax.random.key(0), (8, 6), 1, 30)
    mask = jnp.ones((8, 6), jnp.int32).at[:, 4:].set(0)
    model = jb.zoo.Bert(config)
    params = model.init(jax.random.key(1), ids, mask)["params"]
    recipe = jb.Recipe([Rule(r"layer_\d+/.*", jb.Plan(sparsity=jb.Wanda(0.5)))])
    out, report = jb.oneshot.compress(model, params, [(ids[:4], mask[:4]), (ids[4:], mask[4:])], recipe,
                                      progress=False, row_mask=lambda batch: batch[1])
    assert len(report.rows) == 12 and report.rows[0].path == "layer_0/attention/query"
    # Wanda masks of q, k, v come from the same input norms: the embeddings of the real tokens only
    rows = _bert_embeddings(params, config, np.asarray(ids))[np.asarray(mask) == 1]
    norms = np.sqrt((rows.astype(np.float64) ** 2).sum(0))
    for name in ("query", "key", "value"):
        ref = wanda_kernel(params["layer_0"]["attention"][name]["kernel"], norms, 0.5)
        np.testing.assert_array_equal(np.asarray(out["layer_0"]["attention"][name]["kernel"]) == 0,
                                      np.asarray(ref) == 0)
    embedding = model.apply({"params": jb.leaves.densify(out)}, ids, mask)
    assert embedding.shape == (8, 16)


def _bert_embeddings(params, config, ids):
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    x = (p["word_embeddings"]["embedding"][ids] + p["position_embeddings"]["embedding"][np.arange(ids.shape[1])]
         + p["token_type_embeddings"]["embedding"][0])
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + config.eps)
    return x * p["embeddings_norm"]["scale"] + p["embeddings_norm"]["bias"]


class GeneralBlock(nn.Module):
    """Heads split by DenseGeneral, merged by a two-axis DenseGeneral, MLP as Einsums."""

    @nn.compact
    def __call__(self, x, scale):
        h = nn.DenseGeneral((2, D // 2), name="split")(x)
        h = nn.DenseGeneral(D, axis=(-2, -1), name="merge")(jax.nn.silu(h))
        y = nn.Einsum((D, 2 * D), "btd,df->btf", name="up")(h)
        return x + scale * nn.Einsum((2 * D, D), "btf,fd->btd", name="down")(jax.nn.relu(y))


class GeneralNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(11, D, name="embed")(ids)
        for i in range(2):
            x = GeneralBlock(name=f"block_{i}")(x, 0.5)
        return nn.Dense(11, name="head")(x)


def test_dense_general_and_einsum_layers_compress_in_their_own_layout():
    ids = jax.random.randint(jax.random.key(0), (8, 6), 0, 11)
    params = GeneralNet().init(jax.random.key(1), ids)["params"]
    recipe = jb.Recipe([Rule(r"block_\d+/.*", jb.Plan(quant=jb.GPTQ(INT4)))])
    out, report = jb.oneshot.compress(GeneralNet(), params, [ids], recipe, progress=False)
    merge = out["block_0"]["merge"]["kernel"]
    assert merge.dense_shape == (2, D // 2, D) and [r.shape for r in report.rows[:2]] == [(D, D), (D, D)]
    # the merge projection contracts (heads, head_dim): the same as GPTQ on the flattened kernel
    split_q = out["block_0"]["split"]["kernel"].dense()
    x = jax.nn.silu(jnp.einsum("btd,dhk->bthk", params["embed"]["embedding"][ids], split_q)
                    + params["block_0"]["split"]["bias"])
    rows = np.asarray(x).reshape(-1, D)
    ref = gptq_kernel(np.asarray(params["block_0"]["merge"]["kernel"]).reshape(D, D), _hessian(rows), INT4)
    assert np.mean(_codes(merge).reshape(D, D) == _codes(ref)) >= 0.99
    assert all(r.error < 0.05 for r in report.rows)
    logits = GeneralNet().apply({"params": jb.leaves.densify(out)}, ids)
    assert logits.shape == (8, 6, 11)


def _flat(tree):
    return dict(zip(jb.tree.paths(tree), jax.tree.leaves(tree, is_leaf=jb.leaves.is_compressed)))


def test_nnx_llama_scanned_gives_the_unrolled_result_and_is_left_untouched():
    config = jb.zoo.LlamaConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                intermediate_size=16)
    unrolled = jb.zoo.Llama(config, rngs=nnx.Rngs(0))
    scanned = jb.zoo.Llama(config, rngs=nnx.Rngs(0), scan_layers=True)
    flat = _flat(nnx.state(unrolled, nnx.Param))
    nnx.update(scanned, jb.tree.map_with_path(
        lambda p, x: jnp.stack([flat[p.replace("layers/", f"layers/{i}/")] for i in range(2)])
        if p.startswith("layers/") else flat[p], nnx.state(scanned, nnx.Param)))
    ids = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
    before = jax.tree.map(np.asarray, nnx.state(unrolled))
    recipe = jb.Recipe([Rule(r"layers/(\d+/)?self_attn/.*", jb.Plan(quant=jb.GPTQ(INT4))),   # one rule, both forms
                        Rule(r"layers/.*", jb.Plan(sparsity=jb.SparseGPT(NM(2, 4))))])
    a, ra = jb.oneshot.compress(unrolled, None, [ids[:2], ids[2:]], recipe, progress=False)
    b, rb = jb.oneshot.compress(scanned, None, [ids[:2], ids[2:]], recipe, progress=False)
    fa, fb = _flat(a), _flat(b)
    for path, leaf in fb.items():
        if path.startswith("layers/") and path.endswith("kernel"):
            for i in range(2):
                mine = fa[path.replace("layers/", f"layers/{i}/")]
                if "self_attn" in path:
                    np.testing.assert_array_equal(_codes(mine), _codes(leaf)[i])
                else:
                    np.testing.assert_allclose(mine, leaf[i], atol=1e-6)
    assert [r.error for r in ra.rows] == pytest.approx([r.error for r in rb.rows], rel=1e-4)
    assert ra.rows[7].path == "layers/1/self_attn/q_proj" and rb.rows[7].path == "layers[1]/self_attn/q_proj"
    assert len(ra.rows) == 14 and ra.block_passes == 2.0
    unchanged = jax.tree.map(lambda x, y: bool(np.array_equal(x, np.asarray(y))), before, nnx.state(unrolled))
    assert all(jax.tree.leaves(unchanged))
    assert jb.zoo._llama.DecoderLayer.__call__.__qualname__ == "DecoderLayer.__call__"   # the patch is undone
    nnx.update(unrolled, jb.leaves.densify(a))   # the compressed state loads back into the model
    assert unrolled(ids).shape == (4, 8, 32)
    compressed = nnx.merge(nnx.graphdef(scanned), b)  # a scan cannot slice packed int4 codes layer by layer
    with pytest.raises(ValueError, match=r"Llama\(scan_layers=True\) holds compressed block kernels"):
        jb.intercept.run_compressed(compressed)(ids)
    nnx.update(scanned, jb.leaves.densify(b))
    np.testing.assert_allclose(scanned(ids), unrolled(ids), atol=1e-5)


class StackBlock(nn.Module):
    """A residual MLP in the shape ``nn.scan`` wants: ``(carry, broadcast) -> (carry, ys)``."""

    @nn.compact
    def __call__(self, x, scale):
        hidden = jax.nn.relu(nn.Dense(2 * D, name="up")(x))
        return x + scale * nn.Dense(D, name="down")(hidden), None


class StackNet(nn.Module):
    scan: bool
    depth: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        if self.scan:
            stack = nn.scan(StackBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=self.depth)
            x, _ = stack(name="layers")(x, 0.5)
        else:
            for i in range(self.depth):
                x, _ = StackBlock(name=f"layer_{i}")(x, 0.5)
        return nn.Dense(3, name="head")(x)


STACK_PLANS = {"gptq": jb.Plan(quant=jb.GPTQ(INT4)), "sparsegpt": jb.Plan(sparsity=jb.SparseGPT(0.5))}


@pytest.fixture(scope="module")
def linen_stack():
    """Unrolled and ``nn.scan`` params of one model (the scanned ones: the unrolled layers stacked), and
    both compressed by each plan."""
    x = _data()
    unrolled = StackNet(scan=False).init(jax.random.key(4), x)["params"]
    scanned = {k: v for k, v in unrolled.items() if not k.startswith("layer_")}
    scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[unrolled[f"layer_{i}"] for i in range(3)])
    before = jax.tree.map(np.asarray, scanned)
    out = {}
    for name, plan in STACK_PLANS.items():
        recipe = jb.Recipe([Rule(r"layer(s|_\d+)/.*", plan)])
        out[name] = tuple(jb.oneshot.compress(StackNet(scan=scan), params, [x[:16], x[16:]], recipe, progress=False)
                          for scan, params in ((False, unrolled), (True, scanned)))
    return x, unrolled, scanned, before, out


@pytest.mark.parametrize("name", list(STACK_PLANS))
def test_linen_scanned_gives_the_unrolled_result_and_is_left_untouched(linen_stack, name):
    x, _, scanned, before, out = linen_stack
    (a, ra), (b, rb) = out[name]
    for i in range(3):
        for layer in ("up", "down"):
            mine, stacked = a[f"layer_{i}"][layer]["kernel"], b["layers"][layer]["kernel"]
            if name == "gptq":
                assert stacked.dense_shape[0] == 3
                np.testing.assert_array_equal(_codes(mine), _codes(stacked)[i])
                mine, stacked = mine.dense(), stacked.dense()
            np.testing.assert_array_equal(np.asarray(mine) == 0, np.asarray(stacked)[i] == 0)
            np.testing.assert_allclose(np.asarray(mine), np.asarray(stacked)[i], atol=1e-6)
    assert [(r.path.replace("layer_", "layers[").replace("/", "]/", 1), r.method, r.shape, r.sparsity, r.bits)
            for r in ra.rows] == [(r.path, r.method, r.shape, r.sparsity, r.bits) for r in rb.rows]
    assert [r.error for r in ra.rows] == pytest.approx([r.error for r in rb.rows], rel=1e-4)
    assert rb.blocks == 3 and rb.block_passes == 2.0
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, scanned))))
    assert b["layers"]["up"]["bias"] is scanned["layers"]["up"]["bias"]   # what no rule targets comes back as given
    assert b["embed"]["kernel"] is scanned["embed"]["kernel"]
    np.testing.assert_allclose(StackNet(scan=True).apply({"params": jb.leaves.densify(b)}, x),
                               StackNet(scan=False).apply({"params": jb.leaves.densify(a)}, x), atol=1e-5)


def test_linen_scanned_layers_are_compressed_each_on_its_own_inputs(linen_stack):
    x, unrolled, scanned, _, out = linen_stack
    compressed, report = out["sparsegpt"][1]
    assert [r.path for r in report.rows] == [f"layers[{i}]/{n}" for i in range(3) for n in ("up", "down")]
    assert all(r.shape == ((D, 2 * D) if r.path.endswith("up") else (2 * D, D)) for r in report.rows)
    p = jax.tree.map(np.asarray, scanned)
    h = x @ p["embed"]["kernel"] + p["embed"]["bias"]
    for i in range(3):   # each layer's Hessian from its own inputs, left by the compressed layers before it
        layer = {n: (p["layers"][n]["kernel"][i], p["layers"][n]["bias"][i]) for n in ("up", "down")}
        up = np.asarray(sparsegpt_kernel(layer["up"][0], _hessian(h), 0.5))
        hidden = np.maximum(h @ layer["up"][0] + layer["up"][1], 0)   # down's statistics: one run, dense up
        down = np.asarray(sparsegpt_kernel(layer["down"][0], _hessian(hidden), 0.5))
        for name, ref in (("up", up), ("down", down)):
            got = np.asarray(compressed["layers"][name]["kernel"][i])
            np.testing.assert_array_equal(got == 0, ref == 0)
            np.testing.assert_allclose(got, ref, atol=1e-5)
        h = h + 0.5 * (np.maximum(h @ up + layer["up"][1], 0) @ down + layer["down"][1])


# ------------------------------------------------------------------ meshes

@pytest.mark.parametrize("shape", [{"data": 8}, {"data": 2, "fsdp": 4}])
def test_sharded_calibration_gives_the_single_device_result(shape, chain):
    x, params, single, _ = chain
    mesh = jb.parallel.make_mesh(**shape)
    if "fsdp" in shape:   # FSDP: kernels split over their input axis
        params = jax.tree.map(lambda v: jax.device_put(v, jax.sharding.NamedSharding(
            mesh, jax.P("fsdp", None) if v.ndim == 2 else jax.P())), params)
    recipe = jb.Recipe([Rule(f"layer_{i}/dense", plan) for i, plan in enumerate(PLANS)])
    out, _ = jb.oneshot.compress(Chain(), params, [x[:16], x[16:]], recipe, progress=False, mesh=mesh)
    for i, plan in enumerate(PLANS):
        a, b = single[f"layer_{i}"]["dense"]["kernel"], out[f"layer_{i}"]["dense"]["kernel"]
        if plan.quantizer is None:
            np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)
        else:   # equal values (a zero point exactly at a rounding tie may shift a column's codes by one)
            np.testing.assert_allclose(np.asarray(a.dense()), np.asarray(b.dense()), atol=1e-5)
            assert np.mean(_codes(a) == _codes(b)) >= 0.85
            np.testing.assert_array_equal(np.asarray(a.dense()) == 0, np.asarray(b.dense()) == 0)
        first = jax.tree.leaves(b)[0]   # int3 packs 8 rows into 3, which no longer split over 4 devices
        if "fsdp" in shape and first.shape[0] % shape["fsdp"] == 0:   # compressed leaves keep the sharding
            assert first.sharding.spec[0] == "fsdp"


def test_data_parallel_hessians_have_the_single_device_bits(monkeypatch):
    """Issue 29: rows split over data=8 are summed in another order than on one device; the Hessians the
    solvers get are still the same float32 bits (each batch's float64 Hessian, rounded, added up), so
    GPTQ's codes are too."""
    x = _data(rows=256, key=3)
    params = MLPNet().init(jax.random.key(4), x)["params"]
    recipe = jb.Recipe([Rule(".*", jb.Plan(quant=jb.GPTQ(INT4)))])
    solve = _solve.solve

    def run(mesh):
        seen = {}

        def spy(path, w, h, plan):
            seen[path] = np.asarray(h)
            return solve(path, w, h, plan)
        monkeypatch.setattr(_solve, "solve", spy)
        out, _ = jb.oneshot.compress(MLPNet(), params, [x[:128], x[128:]], recipe, progress=False, mesh=mesh)
        return seen, out
    single, ours = run(None)
    split, theirs = run(jb.parallel.make_mesh(data=8))
    first, second = (b.astype(np.float64) for b in (x[:128], x[128:]))   # per batch, then added in float32
    np.testing.assert_array_equal(single["layer_0/up"], (first.T @ first).astype(np.float32)
                                  + (second.T @ second).astype(np.float32))
    for path, h in single.items():
        np.testing.assert_array_equal(split[path], h, err_msg=path)
    for a, b in zip(jax.tree.leaves(ours, is_leaf=jb.leaves.is_compressed),
                    jax.tree.leaves(theirs, is_leaf=jb.leaves.is_compressed)):
        if jb.leaves.is_compressed(a):
            np.testing.assert_array_equal(_codes(a), _codes(b))


# ------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def small():
    x = _data(16)
    return x, MLPNet().init(jax.random.key(3), x)["params"]


def test_a_rule_that_claims_no_targeted_layer_is_an_error(small):
    x, params = small
    with pytest.raises(ValueError, match=r"recipe: pattern .*attention' matches no leaf; available paths: "
                                         r"\[layer_0/down/kernel, layer_0/up/kernel"):
        jb.oneshot.compress(MLPNet(), params, [x], jb.Recipe([Rule(r"layer_\d+/attention", jb.Plan(
            sparsity=0.5))]), progress=False)


def test_a_bad_blocks_pattern_is_a_value_error_naming_it(small):
    x, params = small
    recipe = jb.Recipe([Rule(".*", jb.Plan(sparsity=0.5))])
    with pytest.raises(ValueError, match=r"^blocks: invalid regex '\(': "):  # was a raw re.error
        jb.oneshot.compress(MLPNet(), params, [x], recipe, blocks="(", progress=False)
    with pytest.raises(ValueError, match=r"^blocks: pattern 'layer_9' matches no leaf; available paths: \[layer_0"):
        jb.oneshot.compress(MLPNet(), params, [x], recipe, blocks="layer_9", progress=False)


def test_calibration_batches_of_another_shape_or_dtype_are_errors(small):
    x, params = small
    recipe = jb.Recipe([Rule(".*", jb.Plan(sparsity=0.5))])
    with pytest.raises(ValueError, match=r"calibration batch 1: argument 0/0 has shape \(8, 8\)"):
        jb.oneshot.compress(MLPNet(), params, [x, x[:8]], recipe, progress=False)
    with pytest.raises(ValueError, match="calibration batch 1: .*dtype int32"):
        jb.oneshot.compress(MLPNet(), params, [x, x.astype(np.int32)], recipe, progress=False)
    with pytest.raises(ValueError, match="calibration batch 0 does not run through the model"):
        jb.oneshot.compress(MLPNet(), params, [x[:, :3]], recipe, progress=False)
    # one array is a stack of batches; a model that cannot take its rows says how it was read
    model = jb.models.MLP(features=(8,))
    with pytest.raises(ValueError, match=r"one array, read as 16 batches of shape \(8,\); pass \[x\] for one"):
        jb.oneshot.compress(model, model.init(jax.random.key(0), x)["params"], x, recipe, progress=False)


def test_calibration_batches_may_be_any_iterable_read_once(small):
    x, params = small
    recipe = jb.Recipe([Rule(".*", jb.Plan(sparsity=jb.SparseGPT(0.5)))])
    want, _ = jb.oneshot.compress(MLPNet(), params, [x[:8], x[8:]], recipe, progress=False)
    got, _ = jb.oneshot.compress(MLPNet(), params, (b for b in [x[:8], x[8:]]), recipe, progress=False,
                                 row_mask=lambda b: np.ones(len(b)))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_nan_activations_name_the_layers_that_saw_them(small):
    x, params = small
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"layer_0/up: NaN or inf in the calibration inputs"):
        jb.oneshot.compress(MLPNet(), params, [bad], jb.Recipe([Rule(".*", jb.Plan(sparsity=jb.Wanda(0.5)))]),
                            progress=False)


@pytest.mark.parametrize("plan", [jb.Plan(quant=jb.quant.QuantSpec(bits=8)), jb.Plan(quant=jb.GPTQ(INT4))])
def test_a_nan_weight_is_named_not_blamed_on_the_calibration_data(small, plan):
    x, params = small
    params = jax.tree.map(lambda v: v, params)
    params["layer_1"]["down"]["kernel"] = params["layer_1"]["down"]["kernel"].at[2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"^layer_1/down/kernel: the weights hold NaN or inf \(1 of 64 values\)"):
        jb.oneshot.compress(MLPNet(), params, [x], jb.Recipe([Rule(".*", plan)]), progress=False)


def test_a_hessian_that_is_not_positive_definite_names_the_layer():
    h = np.array([[1.0, 2.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
                 np.float32)
    with pytest.raises(ValueError, match="layer_7/mlp: the input Hessian is not positive definite"):
        _solve.solve("layer_7/mlp", jnp.ones((4, 4)), jnp.asarray(h), jb.Plan(quant=jb.GPTQ(INT4)))


@dataclasses.dataclass(frozen=True)
class Quiet(jb.recipe.Pruner):
    """A method written outside the library: zeroes the kernel rows of the inputs with least energy."""

    sparsity: float
    name: ClassVar[str] = "quiet"
    needs_hessian: ClassVar[bool] = True

    def solve(self, w, hessian, *, pruned=None, path="kernel"):
        if self.sparsity > 0.5:
            raise ValueError(f"{path}: quiet prunes at most half of the inputs, got {self.sparsity}")
        return w.at[jnp.argsort(jnp.diagonal(hessian))[:round(self.sparsity * w.shape[0])]].set(0.0)


def test_a_method_is_one_class_every_consumer_reads_through_its_protocol(small):
    x, params = small
    recipe = jb.Recipe([Rule(".*", jb.Plan(sparsity=Quiet(0.25), quant=jb.quant.QuantSpec(bits=8)))])
    out, report = jb.oneshot.compress(MLPNet(), params, [x], recipe, progress=False)
    quiet = np.argsort(np.sum(x.astype(np.float64) ** 2, axis=0))[:2]   # layer_0/up reads x itself
    want = np.asarray(params["layer_0"]["up"]["kernel"]).copy()
    want[quiet] = 0.0
    np.testing.assert_array_equal(np.asarray(out["layer_0"]["up"]["kernel"].dense()),
                                  np.asarray(jb.quant.QuantSpec(bits=8).fake_quant(jnp.asarray(want))))
    assert report.rows[0].method == "quiet 25% + rtn int8"
    with pytest.raises(ValueError, match="layer_0/down/kernel: Quiet needs calibration data"):
        recipe.apply(params)
    tx, _ = recipe.for_training(optax.sgd(0.0), lambda p, x: x, params)   # trains as magnitude pruning
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(np.mean(np.asarray(optax.apply_updates(params, updates)["layer_1"]["up"]["kernel"]) == 0)) == 0.25
    # an error of the method names the real layer (no message text is edited on the way)
    bad = jb.Recipe([Rule(".*", jb.Plan(sparsity=Quiet(0.75)))])
    with pytest.raises(ValueError, match=r"^layer_0/up: quiet prunes at most half of the inputs, got 0.75"):
        jb.oneshot.compress(MLPNet(), params, [x], bad, progress=False)


# --- a model without repeated blocks is one block: the whole model ----------------------------

class Plain(nn.Module):  # three Dense layers of different widths, with ReLUs between: nothing repeats
    @nn.compact
    def __call__(self, x, *, scale=1.0):
        x = jax.nn.relu(nn.Dense(16)(x)) * scale
        x = jax.nn.relu(nn.Dense(12)(x))
        return nn.Dense(4)(x)


class PlainNnx(nnx.Module):
    def __init__(self, rngs):
        self.up, self.out = nnx.Linear(D, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.up(x)))


@pytest.mark.parametrize("sequential", [False, True])
def test_a_model_without_blocks_is_compressed_whole_each_layer_by_its_solver(sequential):
    x = _data(64)
    params = Plain().init(jax.random.key(2), x)["params"]
    plan = jb.Plan(quant=jb.GPTQ(INT4))
    apply = lambda v, x: Plain().apply(v, x, scale=0.5)   # the caller's own call, keyword included
    out, report = jb.oneshot.compress(apply, params, [x[:32], x[32:]], jb.Recipe([Rule(r".*", plan)]),
                                      progress=False, sequential=sequential)
    assert report.blocks == 1 and [r.path for r in report.rows] == ["Dense_0", "Dense_1", "Dense_2"]
    h = x
    for i, width in enumerate((16, 12, 4)):
        layer = params[f"Dense_{i}"]
        got = out[f"Dense_{i}"]["kernel"]
        assert np.mean(_codes(got) == _codes(_reference(np.asarray(layer["kernel"]), _hessian(h), plan))) >= 0.99
        w = got.dense() if sequential else layer["kernel"]   # later layers see compressed inputs only when sequential
        h = np.asarray(h @ np.asarray(w) + np.asarray(layer["bias"]))
        h = np.maximum(h, 0) * (0.5 if i == 0 else 1.0)


def test_an_nnx_model_without_blocks_compresses_whole():
    x = _data(32)
    model = PlainNnx(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    out, report = jb.oneshot.compress(model, None, [x], jb.Recipe([Rule(r".*", jb.Plan(sparsity=jb.SparseGPT(0.5)))]),
                                      progress=False)
    assert report.blocks == 1 and [r.path for r in report.rows] == ["up", "out"]
    for name in ("up", "out"):
        assert float(np.mean(np.asarray(out[name]["kernel"][...]) == 0)) == 0.5
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))


def test_a_one_layer_decoder_is_one_block_and_its_lm_head_stays_as_given():
    # layers/0 alone was no "repeated" block: the whole model was, and a ".*" rule quantized lm_head
    c = jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    model = jb.zoo.Llama(c, rngs=nnx.Rngs(0))
    out, report = jb.oneshot.compress(model, None, [ids], jb.Recipe([Rule(r".*", jb.Plan(quant=jb.GPTQ(INT4)))]),
                                      progress=False)
    assert report.blocks == 1 and len(report.rows) == 7 and all(r.path.startswith("layers/0/") for r in report.rows)
    np.testing.assert_array_equal(out["lm_head"]["kernel"][...], model.lm_head.kernel[...])
    assert isinstance(out["layers"][0]["mlp"]["up_proj"]["kernel"].get_value(), jb.quant.QArray)


class DropBlock(nnx.Module):
    def __init__(self, rngs):
        self.dense, self.drop = nnx.Linear(D, D, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return x + self.dense(self.drop(x))


class DropNet(nnx.Module):  # built in train mode: Dropout active
    def __init__(self, rngs):
        self.layers = nnx.List([DropBlock(rngs) for _ in range(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_an_nnx_model_in_train_mode_is_calibrated_in_eval_mode_and_left_in_its_mode():
    # Dropout drew random bits inside the engine's traces: TraceContextError
    model, x = DropNet(nnx.Rngs(0)), _data()
    plan = jb.Plan(sparsity=jb.SparseGPT(0.5))
    out, _ = jb.oneshot.compress(model, None, [x], jb.Recipe([Rule(".*", plan)]), progress=False)
    h = x
    for i in range(2):  # eval mode: dropout is the identity
        dense = model.layers[i].dense
        ref = _reference(np.asarray(dense.kernel[...]), _hessian(h), plan)
        np.testing.assert_allclose(np.asarray(out["layers"][i]["dense"]["kernel"][...]), ref, atol=1e-5)
        h = h + h @ ref + np.asarray(dense.bias[...])
    assert model.layers[0].drop.deterministic is False   # the caller's model keeps its mode


class NormRes(nn.Module):  # a residual block with BatchNorm: it reads the batch_stats collection
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="dense")(nn.BatchNorm(use_running_average=True, name="bn")(x))


class NormChain(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = NormRes(name=f"layer_{i}")(x)
        return x


def test_linen_blocks_get_their_non_parameter_collections():
    # full variables {"params", "batch_stats"}: the block runners got only params (ScopeCollectionNotFound)
    x = _data()
    variables = NormChain().init(jax.random.key(1), x)
    stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    plan = jb.Plan(sparsity=jb.SparseGPT(0.5))
    out, _ = jb.oneshot.compress(NormChain(), variables, [x], jb.Recipe([Rule(".*", plan)]), progress=False)
    assert out["batch_stats"] is stats
    h = x
    for i in range(2):
        p, st = variables["params"][f"layer_{i}"], stats[f"layer_{i}"]["bn"]
        normed = (h - np.asarray(st["mean"])) / np.sqrt(np.asarray(st["var"]) + 1e-5) * np.asarray(p["bn"]["scale"]) \
            + np.asarray(p["bn"]["bias"])
        ref = _reference(np.asarray(p["dense"]["kernel"]), _hessian(normed), plan)
        np.testing.assert_allclose(np.asarray(out["params"][f"layer_{i}"]["dense"]["kernel"]), ref, atol=1e-4)
        h = h + normed @ ref + np.asarray(p["dense"]["bias"])
    np.testing.assert_allclose(NormChain().apply(out, x), h, atol=1e-4)


def test_an_nnx_models_whole_state_comes_back_whole_with_the_parameters_compressed():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(D, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.bn(self.a(x))))
    model, x = Net(nnx.Rngs(0)), _data(32)
    nnx.update(model, nnx.map_state(lambda p, v: v + 0.5 if p[-1] == "mean" else v, nnx.state(model, nnx.BatchStat)))
    recipe = jb.Recipe([Rule(r".*", jb.Plan(sparsity=jb.SparseGPT(0.5)))])
    params_only, _ = jb.oneshot.compress(model, nnx.state(model, nnx.Param), [x], recipe, progress=False)
    whole, _ = jb.oneshot.compress(model, nnx.state(model), [x], recipe, progress=False)
    np.testing.assert_array_equal(whole["bn"]["mean"][...], np.full(16, 0.5, np.float32))   # as given
    for name in ("a", "b"):
        np.testing.assert_array_equal(whole[name]["kernel"][...], params_only[name]["kernel"][...])
    assert jax.tree.structure(whole) == jax.tree.structure(nnx.state(model))


# --- migration of per-input-channel scales (AWQ, SmoothQuant): folded into the op producing the input ---

@dataclasses.dataclass(frozen=True)
class Spread(jb.recipe.Pruner):
    """A migration alone, written outside the library: scales from the statistics, weights kept as they are."""

    sparsity: float = 0.0
    name: ClassVar[str] = "spread"
    needs_hessian: ClassVar[bool] = True
    migrates: ClassVar[bool] = True

    def solve(self, w, hessian, *, pruned=None, path="kernel"):
        return w

    def input_scales(self, kernels, stats):
        return 1.0 + 3.0 * stats.absmean + stats.absmax + jnp.diagonal(stats.hessian)


@pytest.mark.parametrize("scan", [False, True])
def test_a_migration_alone_folds_exactly_into_norms_and_linears(tiny_llama_config, scan):
    model = jb.zoo.Llama(tiny_llama_config, rngs=nnx.Rngs(0), scan_layers=scan)
    ids = jax.random.randint(jax.random.key(0), (4, 8), 0, tiny_llama_config.vocab_size)
    before = _flat(nnx.state(model, nnx.Param))
    recipe = jb.Recipe([Rule(".*", jb.Plan(sparsity=Spread()))])
    new, report = jb.oneshot.compress(model, None, [ids[:2], ids[2:]], recipe, progress=False, sequential=scan)
    changed = {p.replace("layers/0/", "layers/") for p, x in _flat(new).items() if not np.array_equal(x, before[p])}
    # the norms and the up projection absorb 1/s; o_proj reads grouped-query attention (4 heads of 2 KV
    # heads' values): no module of the block produces its input alone, so it is left as it is, and said so
    assert {"layers/input_layernorm/scale", "layers/post_attention_layernorm/scale",
            "layers/mlp/up_proj/kernel"} <= changed and not any("o_proj" in p for p in changed)
    assert [r.method for r in report.rows[:4]] == ["spread 0%"] * 3 + ["spread 0% (no fold)"]
    assert report.block_passes == (6.0 if scan else 2.0)   # sequential: one more run, of the float block
    np.testing.assert_allclose(nnx.merge(nnx.graphdef(model), new)(ids), model(ids), rtol=1e-5, atol=1e-5)


class NormMLP(nn.Module):  # a norm, then two linears with a ReLU between (ReLU(z / r) = ReLU(z) / r)
    norm: type = nn.RMSNorm

    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="down")(jax.nn.relu(nn.Dense(16, name="up")(self.norm(name="norm")(x))))


def _outlier_mlp(norm):
    """A NormMLP whose norm scale plants outlier channels 2 and 5 (as in LLMs), its inputs, float64 params."""
    x = jax.random.normal(jax.random.key(0), (64, D))
    params = NormMLP(norm).init(jax.random.key(1), x)["params"]
    params["norm"]["scale"] = params["norm"]["scale"].at[jnp.array([2, 5])].set(30.0)
    params["up"]["bias"] = jax.random.normal(jax.random.key(2), (16,)) * 0.1
    return x, params


def _np_norm(p, x):
    if "bias" in p:   # LayerNorm
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * p["scale"]


def _np_rtn(w, bits):
    step = np.abs(w).max(0) / (2 ** (bits - 1) - 1)
    return np.clip(np.round(w / step), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) * step


def _np_migrated(params, x, scales_of, bits):
    """numpy: scales of up (input: the norm's output) and down (input: the ReLU's) from the float model,
    both folded (norm / s_up; up rows * s_up, columns and bias / s_down; down rows * s_down), then RTN;
    and each layer's relative output error ``|x' (W' - W_s)|^2 / |x' W_s|^2`` on its scaled inputs."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = _np_norm(p["norm"], np.asarray(x, np.float64))
    u = np.maximum(h @ p["up"]["kernel"] + p["up"]["bias"], 0.0)
    s_up, s_down = scales_of(h, p["up"]["kernel"]), scales_of(u, p["down"]["kernel"])
    scaled = {"up": (h / s_up, p["up"]["kernel"] * s_up[:, None] / s_down), "down": (u / s_down, p["down"]["kernel"]
                                                                                       * s_down[:, None])}
    rounded = {name: _np_rtn(w, bits) for name, (_, w) in scaled.items()}
    errors = [np.sum((xs @ (rounded[n] - w)) ** 2) / np.sum((xs @ w) ** 2) for n, (xs, w) in scaled.items()]
    return {"norm": {k: v / s_up for k, v in p["norm"].items()},
            "up": {"kernel": rounded["up"], "bias": p["up"]["bias"] / s_down},
            "down": {"kernel": rounded["down"], "bias": p["down"]["bias"]}}, errors


def _np_awq_scales(x, w, bits=4, grid=20):
    """AWQ's search: s = a^alpha / sqrt(max * min), alpha = i / grid, least tr(D^T X^T X D)."""
    h, a, best = x.T @ x, np.abs(x).mean(0), None
    for alpha in np.arange(grid) / grid:
        s = np.maximum(a ** alpha, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        d = _np_rtn(w * s[:, None], bits) / s[:, None] - w
        error = np.sum(d * (h @ d))
        if best is None or error < best[0]:
            best = (error, s)
    return best[1]


def _dense_tree(tree):
    return jax.tree.map(lambda x: np.asarray(jb.leaves.densify(x), np.float64), tree, is_leaf=jb.leaves.is_compressed)


def test_awq_equals_a_numpy_awq_and_beats_round_to_nearest_on_outlier_channels():
    x, params = _outlier_mlp(nn.RMSNorm)
    int4 = jb.quant.QuantSpec(bits=4, granularity=jb.quant.PER_CHANNEL)
    awq, awq_report = jb.oneshot.compress(NormMLP(), params, [x], jb.Recipe([Rule(".*", jb.Plan(  # scales alone
        quant=jb.AWQ(int4, clip=False, duo=False)))]), progress=False)   # llm-awq's a^alpha, as _np_awq_scales
    want, errors = _np_migrated(params, x, _np_awq_scales, bits=4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), _dense_tree(awq), want)
    assert [r.error for r in awq_report.rows] == pytest.approx(errors, rel=1e-3)   # statistics of x / s
    rtn, rtn_report = jb.oneshot.compress(NormMLP(), params, [x], jb.Recipe([Rule(".*", jb.Plan(quant=int4))]),
                                          progress=False)
    assert [r.method for r in awq_report.rows] == ["awq + rtn int4"] * 2
    assert awq_report.rows[0].error < 0.5 * rtn_report.rows[0].error

    def error(tree):
        return float(jnp.sum((NormMLP().apply({"params": jb.leaves.densify(tree)}, x) - NormMLP().apply(
            {"params": params}, x)) ** 2))
    assert error(awq) < error(rtn)


def _np_per_token_int8(x):
    step = np.abs(x).max(-1, keepdims=True) / 127
    return np.clip(np.round(x / step), -127, 127) * step


def test_smoothquant_equals_a_numpy_smoothquant_and_helps_w8a8_on_outlier_channels():
    x, params = _outlier_mlp(nn.LayerNorm)
    int8 = jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL)

    def np_scales(x, w, alpha=0.5):
        act, weight = np.maximum(np.abs(x).max(0), 1e-5), np.maximum(np.abs(w).max(1), 1e-5)
        return np.maximum(act ** alpha / weight ** (1 - alpha), 1e-5)
    sq, report = jb.oneshot.compress(NormMLP(nn.LayerNorm), params, [x],
                                     jb.Recipe([Rule(".*", jb.Plan(quant=jb.SmoothQuant(int8)))]), progress=False)
    want, errors = _np_migrated(params, x, np_scales, bits=8)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), _dense_tree(sq), want)
    assert [r.error for r in report.rows] == pytest.approx(errors, rel=1e-3)
    assert report.rows[0].method == "smoothquant 0.5 + rtn int8"
    # W8A8 of the first layer: per-token int8 activations times int8 per-channel weights, in numpy
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs = np.asarray(x, np.float64)
    exact = _np_norm(p["norm"], xs) @ p["up"]["kernel"]
    plain = _np_per_token_int8(_np_norm(p["norm"], xs)) @ _np_rtn(p["up"]["kernel"], 8)
    got = _dense_tree(sq)   # the folded model: its activations are flatter
    undo = p["up"]["bias"] / got["up"]["bias"]   # s of the down fold: the up layer's outputs in their own units
    smooth = _np_per_token_int8(_np_norm(got["norm"], xs)) @ (got["up"]["kernel"] * undo)
    assert np.sum((smooth - exact) ** 2) < 0.5 * np.sum((plain - exact) ** 2)


class PostNorm(nn.Module):  # BERT-like: the linears read the block input (the norm before is another block's)
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(name="norm")(x + nn.Dense(D, name="out")(jax.nn.gelu(nn.Dense(16, name="inner")(x))))


class PostNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return PostNorm(name="layer_1")(PostNorm(name="layer_0")(x))


def test_a_group_without_a_producer_in_its_block_gets_the_inner_method_and_says_so():
    x = jax.random.normal(jax.random.key(0), (32, D))
    params = PostNormNet().init(jax.random.key(1), x)["params"]
    awq, report = jb.oneshot.compress(PostNormNet(), params, [x], jb.Recipe([Rule(".*", jb.Plan(
        quant=jb.AWQ(INT4, clip=False)))]), progress=False)
    rtn, _ = jb.oneshot.compress(PostNormNet(), params, [x], jb.Recipe([Rule(".*", jb.Plan(quant=INT4))]),
                                 progress=False)
    jax.tree.map(np.testing.assert_array_equal, _dense_tree(awq), _dense_tree(rtn))
    assert {r.method for r in report.rows} == {"awq + rtn int4 g4 (no fold)"}


class TwoHeads(nn.Module):  # two linears read one normalized input: they share one migration
    @nn.compact
    def __call__(self, x):
        h = nn.RMSNorm(name="norm")(x)
        return nn.Dense(D, name="a")(h) + nn.Dense(D, name="b")(h)


def test_layers_reading_one_input_with_different_migrations_are_refused_naming_them():
    x = jax.random.normal(jax.random.key(0), (16, D))
    params = TwoHeads().init(jax.random.key(1), x)["params"]
    recipe = jb.Recipe([Rule("a", jb.Plan(quant=jb.AWQ(INT4))), Rule("b", jb.Plan(quant=INT4))])
    with pytest.raises(ValueError, match=r"share one migration.*a \(awq clip \+ rtn int4 g4\), b \(none\)"):
        jb.oneshot.compress(TwoHeads(), params, [x], recipe, progress=False)


def test_each_block_shape_compiles_one_block_program_and_one_hessian_program(monkeypatch):
    """Per block shape, calibrating and propagating compile two programs: the block run (the statistics
    run and the output run are one program) and the Hessian sums of all its groups (not one per input
    width); assembling compiles none (a 2-d kernel's leaf is its solver's QArray)."""
    phases = ["other"]
    timed = _engine._phase

    @contextlib.contextmanager
    def phase(name):
        phases.append(name)
        try:
            with timed(name):
                yield
        finally:
            phases.pop()

    compiled: dict[str, list[str]] = {}

    def listen(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.setdefault(phases[-1], []).append(kwargs.get("fun_name", "?"))

    monkeypatch.setattr(_engine, "_phase", phase)
    x = np.asarray(jax.random.normal(jax.random.key(3), (16, 24)))  # inputs of widths 24 and 48 in each block
    params = MLPNet(layers=3, hidden=48).init(jax.random.key(4), x)["params"]
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        new, _ = jb.oneshot.compress(MLPNet(layers=3, hidden=48), params, [x], jb.Recipe([Rule(r".*", jb.Plan(quant=INT4))]),
                                     progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(compiled.get("calibrate", []) + compiled.get("propagate", [])) == 2, compiled
    assert compiled.get("assemble", []) == [], compiled
    kernel = params["layer_2"]["up"]["kernel"]  # and the leaf is the kernel on its grid
    np.testing.assert_array_equal(np.asarray(new["layer_2"]["up"]["kernel"].dense()),
                                  np.asarray(INT4.quantize(kernel).dense()))
