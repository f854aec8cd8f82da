"""Automatic mixed precision (issue 30): jb.oneshot.auto quantizes each layer at every bit width with the engine
and scores it by its Fisher-weighted output error under a loss; jb.recipe.auto picks bits per layer by the exact
knapsack under an average-bits budget."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_big as jb

D = 128
CHOICES = (2, 3, 4, 8)
# Round to nearest: the measurement and allocation are the same for any quantizer, and GPTQ compiles 4x longer.
RTN = jb.RTN(jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128)))


def _auto(bits):
    return jb.recipe.Auto(bits=bits, choices=CHOICES, quantizer=RTN)


class Block(nn.Module):
    down_std: float

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(D, name="up")(x))
        return x + nn.Dense(D, name="down", kernel_init=nn.initializers.normal(self.down_std))(h)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):  # one layer's output error outweighs the others' (its weights are 30x larger)
        return Block(3.0, name="layer_1")(Block(0.1, name="layer_0")(x))


def _loss(outputs, batch):
    return jnp.sum((outputs - batch) ** 2)


@pytest.fixture(scope="module")
def measured():
    x = jax.random.normal(jax.random.key(0), (256, D)) * jnp.linspace(0.2, 3.0, D)  # uneven input channels
    params = Net().init(jax.random.key(1), x)["params"]
    recipe, sens = jb.oneshot.auto(Net(), params, [x[:128], x[128:]], _auto(4.25), loss=_loss, progress=False)
    return params, x, recipe, sens


def _reference_forward(params, x, eps):
    """Net by hand, each linear's output plus ``eps[layer]``; returns the output and each linear's input."""
    inputs = {}
    for block in ("layer_0", "layer_1"):
        p = params[block]
        inputs[f"{block}/up"] = x
        h = jax.nn.gelu(x @ p["up"]["kernel"] + p["up"]["bias"] + eps[f"{block}/up"])
        inputs[f"{block}/down"] = h
        x = x + h @ p["down"]["kernel"] + p["down"]["bias"] + eps[f"{block}/down"]
    return x, inputs


def _allocation(recipe, paths):
    """{path: bits} read back from the recipe's rules (first match wins)."""
    out = {}
    for path in paths:
        rule = next(r for r in recipe.rules if r.matches(path))
        out[path] = rule.value.quantizer.spec.bits
    return out


def _brute_force(sens, budget):
    paths = sorted(sens.weights)
    best = None
    for combo in itertools.product(CHOICES, repeat=len(paths)):
        if sum(sens.sizes[p][b] for p, b in zip(paths, combo)) <= budget:
            err = sum(sens.errors[p][b] for p, b in zip(paths, combo))
            if best is None or err < best[0]:
                best = (err, dict(zip(paths, combo)))
    return best


def test_costs_are_the_second_order_loss_estimates_of_the_engines_kernels(measured):
    params, x, _, sens = measured
    layers = [f"layer_{i}/{n}" for i in (0, 1) for n in ("down", "up")]
    assert sorted(sens.weights) == [f"{p}/kernel" for p in layers]
    batches = [x[:128], x[128:]]
    for bits in (2, 4):  # the kernels the engine makes at this width, on the float model's inputs and gradients
        out, _ = jb.oneshot.compress(Net(), params, batches, _auto(4.25).uniform(bits), progress=False)
        expected = dict.fromkeys(layers, 0.0)
        for batch in batches:
            eps = {p: jnp.zeros((len(batch), D)) for p in layers}
            grads = jax.grad(lambda e, b=batch: _loss(_reference_forward(params, b, e)[0], b))(eps)
            inputs = _reference_forward(params, batch, eps)[1]
            for p in layers:
                block, name = p.split("/")
                new = np.asarray(out[block][name]["kernel"].dense(), np.float64)
                dy = np.asarray(inputs[p], np.float64) @ (new - np.asarray(params[block][name]["kernel"]))
                g = np.asarray(grads[p], np.float64)  # d loss / d output: gradient term + diagonal Fisher term
                expected[p] += np.sum(g * dy) + np.sum(g ** 2 * dy ** 2) / 2
        for p in layers:
            assert sens.errors[f"{p}/kernel"][bits] == pytest.approx(expected[p], rel=2e-3), (p, bits)
        assert sens.sizes["layer_0/up/kernel"][bits] == out["layer_0"]["up"]["kernel"].nbytes  # what is stored
    for path, errors in sens.errors.items():  # 8 bits cost far less than 2 (the gradient term has either sign)
        assert abs(errors[8]) < abs(errors[2]) / 10, path


class TwoHeads(nn.Module):
    """``0.01 * big(x) + 10 * small(x)``: ``big`` has 30x larger weights (900x the output error at a width),
    but the loss depends on ``small``'s output 1000x more."""

    @nn.compact
    def __call__(self, x):
        big = nn.Dense(D, name="big", kernel_init=nn.initializers.normal(3.0))(x)
        return 0.01 * big + 10 * nn.Dense(D, name="small", kernel_init=nn.initializers.normal(0.1))(x)


@pytest.mark.parametrize("measured", [False, True])
def test_the_layer_the_loss_depends_on_gets_the_bits_not_the_one_with_the_larger_output_error(measured):
    x = jax.random.normal(jax.random.key(0), (128, D))
    target = jax.random.normal(jax.random.key(2), (128, D))
    params = TwoHeads().init(jax.random.key(1), x)["params"]
    loss = lambda out, batch: jnp.sum((out - target) ** 2)  # noqa: E731
    options = jb.recipe.Auto(bits=5.25, choices=(2, 8), quantizer=RTN)  # room for one layer at 8 bits
    recipe, sens = jb.oneshot.auto(TwoHeads(), params, [x], options, loss=loss, measured=measured, progress=False)
    chosen = _allocation(recipe, sens.weights)
    assert chosen == {"big/kernel": 2, "small/kernel": 8}
    swapped = jb.Recipe([jb.Rule("big", options.plan(8)), jb.Rule("small", options.plan(2))])
    losses = {}
    for name, r in (("auto", recipe), ("swapped", swapped)):  # and the real loss agrees
        out, _ = jb.oneshot.compress(TwoHeads(), params, [x], r, progress=False)
        losses[name] = float(loss(TwoHeads().apply({"params": jb.leaves.densify(out)}, x), x))
        if name == "auto":  # mixed widths store what the sensitivity counted
            assert out["big"]["kernel"].nbytes + out["small"]["kernel"].nbytes == sens.nbytes(chosen)
    assert losses["auto"] < losses["swapped"]
    if measured:  # a measured cost is the loss with that one kernel quantized, the other float, minus the float loss
        base = float(loss(TwoHeads().apply({"params": params}, x), x))
        one = {**params, "small": {**params["small"], "kernel": out["small"]["kernel"].dense()}}
        assert sens.errors["small/kernel"][2] == pytest.approx(float(loss(TwoHeads().apply({"params": one}, x), x))
                                                               - base, rel=1e-4)


def test_a_scanned_decoder_gets_the_costs_and_bytes_of_its_unrolled_twin():
    from flax import nnx
    config = jb.zoo.LlamaConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                intermediate_size=16)
    unrolled = jb.zoo.Llama(config, rngs=nnx.Rngs(0))
    scanned = jb.zoo.Llama(config, rngs=nnx.Rngs(0), scan_layers=True)
    flat = dict(zip(jb.tree.paths(nnx.state(unrolled, nnx.Param)), jax.tree.leaves(nnx.state(unrolled, nnx.Param))))
    nnx.update(scanned, jb.tree.map_with_path(
        lambda p, x: jnp.stack([flat[p.replace("layers/", f"layers/{i}/")] for i in range(2)])
        if p.startswith("layers/") else flat[p], nnx.state(scanned, nnx.Param)))
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, config.vocab_size)
    options = jb.recipe.Auto(bits=5, choices=(2, 4), quantizer=jb.RTN(jb.quant.QuantSpec(
        bits=4, granularity=jb.quant.PER_CHANNEL)))
    _, a = jb.oneshot.auto(unrolled, None, [ids], options, progress=False)  # the default loss
    _, b = jb.oneshot.auto(scanned, None, [ids], options, progress=False)
    assert len(b.errors) == 7 and len(a.errors) == 14
    for path, costs in b.errors.items():
        for bits, cost in costs.items():
            unrolled_cost = sum(a.errors[path.replace("layers/", f"layers/{i}/")][bits] for i in range(2))
            assert cost == pytest.approx(unrolled_cost, rel=1e-4) and cost != 0, (path, bits)
            assert b.sizes[path][bits] == sum(a.sizes[path.replace("layers/", f"layers/{i}/")][bits] for i in range(2))


@pytest.mark.parametrize("bits", [2.5, 3.3, 4.25, 6.0])
def test_allocation_is_the_brute_force_optimum_within_the_budget_and_uses_it(measured, bits):
    _, _, _, sens = measured
    recipe = jb.recipe.auto(sens, _auto(bits))
    got = _allocation(recipe, sens.weights)
    budget = int(np.floor(bits * sens.total_weights() / 8))
    best_error, best = _brute_force(sens, budget)
    assert sens.error(got) == pytest.approx(best_error, rel=1e-12)
    assert got == best  # distinct real-valued errors: the optimum is unique
    used = sens.nbytes(got)
    assert used <= budget
    for path, b in got.items():  # no single upgrade still fits
        for up in (c for c in CHOICES if c > b):
            assert used - sens.sizes[path][b] + sens.sizes[path][up] > budget, (path, b, up)


def test_at_uniform_int4_bytes_auto_has_no_more_error_and_compresses_to_those_bytes(measured):
    params, x, _, sens = measured
    int4 = {p: 4 for p in sens.weights}
    bits = 8 * sens.nbytes(int4) / sens.total_weights()
    assert bits == 4.25  # int4 in groups of 128 with float32 scales: scales count
    recipe = jb.recipe.auto(sens, _auto(bits))
    got = _allocation(recipe, sens.weights)
    assert sens.error(got) <= sens.error(int4)
    out, report = jb.oneshot.compress(Net(), params, [x[:128], x[128:]], recipe, progress=False)
    stored = {p: out[p.split("/")[0]][p.split("/")[1]]["kernel"] for p in sens.weights}
    assert sum(q.nbytes for q in stored.values()) == sens.nbytes(got) <= sens.nbytes(int4)
    assert {f"{r.path}/kernel": r.bits for r in report.rows} == got


def test_scalars_of_every_kind_are_read_and_bad_options_name_the_value(measured):
    _, _, _, sens = measured
    for bits in (4.25, np.float32(4.25), jnp.asarray(4.25), np.int64(4), 4):
        assert jb.recipe.Auto(bits=bits).bits == float(bits)
    with pytest.raises(ValueError, match=r"Auto.bits must be a finite number > 0, got nan"):
        jb.recipe.Auto(bits=float("nan"))
    with pytest.raises(TypeError, match=r"Auto.bits must be a number, got '4.25'"):
        jb.recipe.Auto(bits="4.25")
    with pytest.raises(ValueError, match=r"QuantSpec.bits must be an int in \[2, 8\], got 9"):
        jb.recipe.Auto(bits=4, choices=(4, 9))
    with pytest.raises(ValueError, match=r"repeated bit width: \(4, 4\)"):
        jb.recipe.Auto(bits=4, choices=(4, 4))
    with pytest.raises(ValueError, match=r"non-empty tuple of bit widths, got \(\)"):
        jb.recipe.Auto(bits=4, choices=())
    with pytest.raises(TypeError, match="Auto.quantizer must be a quantizer"):
        jb.recipe.Auto(bits=4, quantizer=jb.quant.QuantSpec(bits=4))
    for bits, low, high in ((2.2, "2.25", "8.25"), (8.3, "2.25", "8.25")):
        with pytest.raises(ValueError, match=rf"bits={bits} .* \[{low}, {high}\]"):
            jb.recipe.auto(sens, _auto(bits))
    with pytest.raises(ValueError, match=r"no measurement for bits \[5\]"):
        jb.recipe.auto(sens, jb.recipe.Auto(bits=4.25, choices=(4, 5), quantizer=RTN))


def test_a_budget_the_layers_cannot_meet_fails_after_the_first_run(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (64, D))
    params = Net().init(jax.random.key(1), x)["params"]
    runs = []
    compress = jb.oneshot.compress
    monkeypatch.setattr(jb.oneshot._engine, "compress", lambda *a, **k: runs.append(1) or compress(*a, **k))
    with pytest.raises(ValueError, match=r"bits=9.0 average bits per weight is outside .* \[4.25, 8.25\]"):
        jb.oneshot.auto(Net(), params, [x], jb.recipe.Auto(bits=9, choices=(4, 8), quantizer=RTN), progress=False)
    assert runs == [1]


def test_an_auto_recipe_saves_as_a_recipe_file_that_loads_back_equal(measured, tmp_path):
    _, _, _, sens = measured
    recipe = jb.recipe.auto(sens, jb.recipe.Auto(bits=3.3, choices=CHOICES))  # GPTQ with its options, dense head
    path = tmp_path / "auto.toml"
    path.write_text(jb.recipe.to_toml(recipe))
    dense = jb.Plan()  # a rule that leaves its layers as they are reads back as the empty plan
    assert jb.recipe.load(path).rules == tuple(dataclasses.replace(r, value=r.value or dense) for r in recipe.rules)
    pruned = jb.Recipe([jb.Rule("layer_0/up", jb.Plan(sparsity=0.5, quant=jb.quant.QuantSpec(bits=4)))])
    with pytest.raises(ValueError, match=r"rule 'layer_0/up': magnitude 50% \+ rtn int4 has no recipe-file form"):
        jb.recipe.to_toml(pruned)
    float16 = jb.Recipe([jb.Rule("x", jb.Plan(quant=jb.quant.QuantSpec(bits=4, scale_dtype="float16")))])
    with pytest.raises(ValueError, match=r"rule 'x': rtn int4 has no recipe-file form"):
        jb.recipe.to_toml(float16)
