"""Automatic mixed precision (issue 30): jb.oneshot.auto quantizes each layer at every bit width with the engine,
per fold of the calibration batches on the other folds, and scores it on the fold by a second-order estimate of the
loss increase; jb.recipe.auto checks the allocation on held-out folds against uniform bits and picks bits per layer
by the exact knapsack under an average-bits budget."""

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
    options = dataclasses.replace(_auto(4.25), folds=1)  # in-sample: round to nearest fits no data
    recipe, sens = jb.oneshot.auto(Net(), params, [x[:128], x[128:]], options, loss=_loss, progress=False)
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


def _brute_force(sens, budget, choices=CHOICES, errors=None):
    """(least summed cost, {path: bits}) within ``budget`` bytes among ``choices``."""
    paths = sorted(sens.weights)
    errors = errors or sens.errors
    best = None
    for combo in itertools.product(choices, repeat=len(paths)):
        if sum(sens.sizes[p][b] for p, b in zip(paths, combo)) <= budget:
            err = sum(errors[p][b] for p, b in zip(paths, combo))
            if best is None or err < best[0]:
                best = (err, dict(zip(paths, combo)))
    return best


def _reference_costs(params, batch, kernels, layers):
    """{layer: sum(g * dy + (g * dy)**2 / 2)} on ``batch``, in float64, for the quantized ``kernels``."""
    eps = {p: jnp.zeros((len(batch), D)) for p in layers}
    grads = jax.grad(lambda e: _loss(_reference_forward(params, batch, e)[0], batch))(eps)
    inputs = _reference_forward(params, batch, eps)[1]
    out = {}
    for p in layers:
        block, name = p.split("/")
        new = np.asarray(kernels[block][name]["kernel"].dense(), np.float64)
        dy = np.asarray(inputs[p], np.float64) @ (new - np.asarray(params[block][name]["kernel"]))
        g = np.asarray(grads[p], np.float64)  # d loss / d output: gradient term + diagonal Fisher term
        out[p] = np.sum(g * dy) + np.sum(g ** 2 * dy ** 2) / 2
    return out


def test_costs_are_the_second_order_loss_estimates_of_the_engines_kernels(measured):
    params, x, _, sens = measured
    layers = [f"layer_{i}/{n}" for i in (0, 1) for n in ("down", "up")]
    assert sorted(sens.weights) == [f"{p}/kernel" for p in layers]
    batches = [x[:128], x[128:]]
    for bits in (2, 4):  # the kernels the engine makes at this width, on the float model's inputs and gradients
        out, _ = jb.oneshot.compress(Net(), params, batches, _auto(4.25).uniform(bits), progress=False)
        expected = [_reference_costs(params, batch, out, layers) for batch in batches]
        for p in layers:
            assert sens.errors[f"{p}/kernel"][bits] == pytest.approx(sum(e[p] for e in expected), rel=2e-3), (p, bits)
        assert sens.sizes["layer_0/up/kernel"][bits] == out["layer_0"]["up"]["kernel"].nbytes  # what is stored
    for path, errors in sens.errors.items():  # 8 bits cost far less than 2 (the gradient term has either sign)
        assert abs(errors[8]) < abs(errors[2]) / 10, path


class Wide(nn.Module):
    """One linear with more inputs (128) than a fold has tokens (48): GPTQ can fit a fold's data almost exactly."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="dense")(x)


def test_each_folds_cost_is_measured_with_kernels_fitted_on_the_other_folds():
    x = jax.random.normal(jax.random.key(0), (96, D))
    teacher = jax.random.normal(jax.random.key(2), (D, D)) / np.sqrt(D)
    params = Wide().init(jax.random.key(1), x)["params"]
    batches = [x[:48], x[48:]]
    loss = lambda out, batch: jnp.sum((out - batch @ teacher) ** 2)  # noqa: E731
    gptq = jb.GPTQ(jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(128)))
    options = jb.recipe.Auto(bits=2.25, choices=(2,), quantizer=gptq)
    _, sens = jb.oneshot.auto(Wide(), params, batches, options, loss=loss, progress=False)
    w = np.asarray(params["dense"]["kernel"], np.float64)

    fitted = [jb.oneshot.compress(Wide(), params, [b], options.uniform(2), progress=False)[0]["dense"]["kernel"]
              for b in batches]  # GPTQ's kernel fitted on each batch alone

    def cost(kernel, batch):  # the second-order estimate, by hand
        dy = np.asarray(batch, np.float64) @ (np.asarray(kernel.dense(), np.float64) - w)
        g = np.asarray(jax.grad(loss)(Wide().apply({"params": params}, batch), batch), np.float64)
        return np.sum(g * dy) + np.sum(g ** 2 * dy ** 2) / 2

    held_out = [cost(fitted[1 - f], batches[f]) for f in (0, 1)]
    assert [f["dense/kernel"][2] for f in sens.folds] == pytest.approx(held_out, rel=2e-3)
    in_sample = [cost(fitted[f], batches[f]) for f in (0, 1)]  # scored on the data the kernel was fitted to
    assert sum(in_sample) < sum(held_out) / 3, (in_sample, held_out)


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


def test_the_check_keeps_the_lowest_width_whose_allocation_wins_on_the_held_out_folds():
    """Three folds of synthetic costs; the held-out loss of a mix is a fixed table (not the costs): in-sample the
    mix with 2-bit layers looks best, held out it is worse than uniform; without 2 bits the mix is better."""
    paths = [f"l{i}" for i in range(4)]
    sizes = {p: {b: 16 * b for b in (2, 3, 4, 8)} for p in paths}
    rng = np.random.default_rng(0)
    folds = tuple({p: {2: 0.35 + rng.random() / 100, 3: 0.32, 4: 0.3, 8: 0.0} for p in paths[:3]}
                  | {"l3": {2: 9.0, 3: 6.0, 4: 5.0, 8: 0.0}} for _ in range(3))
    errors = {p: {b: sum(f[p][b] for f in folds) for b in (2, 3, 4, 8)} for p in paths}

    def held_out(fold, mix):  # 2 bits hurt far more on new data than the costs say
        return sum({2: 5.0, 3: 1.0, 4: 1.0, 8: 0.0}[b] * (3 if p == "l3" else 1) for p, b in mix.items()) + fold

    sens = jb.recipe.Sensitivity(errors, sizes, dict.fromkeys(paths, 128), folds, held_out)
    budget = 5 * 4 * 128 // 8  # 5 bits per weight: room for l3 at 8 bits
    expected, mixes = {}, {}
    for lowest in (2, 3, 4):  # each fold's mix chosen by brute force on the other two folds' costs
        widths = tuple(b for b in (2, 3, 4, 8) if b >= lowest)
        for f in range(3):
            mixes[lowest, f] = _brute_force(sens, budget, widths, {
                p: {b: sum(g[p][b] for j, g in enumerate(folds) if j != f) for b in widths} for p in paths})[1]
        expected[lowest] = [held_out(f, dict.fromkeys(paths, 4)) - held_out(f, mixes[lowest, f]) for f in range(3)]
    check = sens.check(5)
    assert check.uniform == 4 and {k: list(v) for k, v in check.gains.items()} == expected
    assert max(expected[2]) < 0 < min(expected[3]) and expected[3] == expected[4]
    assert (check.lowest, check.fold) == (4, 2)  # equal gains on each fold: the fewer, wider widths, the last fold
    options = jb.recipe.Auto(bits=5, choices=(2, 3, 4, 8), quantizer=RTN)
    got = _allocation(jb.recipe.auto(sens, options), paths)
    assert got == check.allocation == mixes[4, 2] == {"l0": 4, "l1": 4, "l2": 4, "l3": 8}
    no_check = jb.recipe.Sensitivity(errors, sizes, dict.fromkeys(paths, 128))  # what the costs alone pick
    assert 2 in _allocation(jb.recipe.auto(no_check, options), paths).values()


class Planted(nn.Module):
    """Two linears side by side; the loss (below) holds ``liar`` at its float output, so its gradient there is 0
    and the second-order estimate (gradient and squared-gradient terms) says quantizing it costs nothing."""

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([nn.Dense(D, name="liar")(x), nn.Dense(D, name="honest")(x)], axis=-1)


def test_a_layer_whose_estimate_lies_is_caught_on_held_out_folds_and_the_recipe_stays_uniform():
    x = jax.random.normal(jax.random.key(0), (128, D))
    params = Planted().init(jax.random.key(1), x)["params"]
    teacher = jax.random.normal(jax.random.key(2), (D, D)) / np.sqrt(D)
    liar = lambda batch: batch @ params["liar"]["kernel"] + params["liar"]["bias"]  # noqa: E731

    def loss(out, batch):
        return jnp.sum((out[:, :D] - liar(batch)) ** 2) + jnp.sum((out[:, D:] - batch @ teacher) ** 2)

    options = jb.recipe.Auto(bits=4.25, choices=(2, 4, 6), quantizer=RTN)
    recipe, sens = jb.oneshot.auto(Planted(), params, [x[:64], x[64:]], options, loss=loss, progress=False)
    assert sens.errors["liar/kernel"] == {2: 0.0, 4: 0.0, 6: 0.0}  # the lie
    unchecked = jb.recipe.auto(jb.recipe.Sensitivity(sens.errors, sens.sizes, sens.weights), options)
    mix = _allocation(unchecked, sens.weights)
    assert mix == {"liar/kernel": 2, "honest/kernel": 6}  # what the costs alone pick (the old recipe)

    def real(bits):  # the loss increase over all batches, each kernel rounded to nearest at its width by hand
        new = {}
        for name in ("liar", "honest"):
            w = np.asarray(params[name]["kernel"], np.float64)
            step = np.abs(w).max(axis=0) / (2 ** (bits[f"{name}/kernel"] - 1) - 1)  # one group of 128 inputs
            new[name] = {**params[name], "kernel": jnp.asarray(np.round(w / step) * step, jnp.float32)}
        return float(loss(Planted().apply({"params": new}, x), x) - loss(Planted().apply({"params": params}, x), x))

    assert real(mix) > 2 * real(dict.fromkeys(sens.weights, 4))  # and the mix is really worse than uniform int4
    check = sens.check(4.25)
    assert check.uniform == 4 and max(check.gains[2]) < 0 and check.lowest is None
    assert _allocation(recipe, sens.weights) == dict.fromkeys(sens.weights, 4)


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
