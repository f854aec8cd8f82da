"""Recipes: one per-layer plan read by post-training compression, training and the report."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_big as jb
from jaxopt_big import Plan, Recipe, Rule
from jaxopt_big.quant import PER_CHANNEL, QuantSpec

KEY = jax.random.key(0)
PARAMS = {f"layer_{i}": {"attn": {"kernel": jax.random.normal(jax.random.fold_in(KEY, 2 * i), (16, 16))},
                         "mlp": {"kernel": jax.random.normal(jax.random.fold_in(KEY, 2 * i + 1), (16, 32)),
                                 "bias": jnp.ones(32)}}
          for i in range(2)}
RECIPE = Recipe([Rule(r"layer_\d+/mlp", Plan(sparsity=jb.sparsity.NM(2, 4), quant=QuantSpec(bits=4))),
                 Rule("layer_0/.*", Plan(sparsity=0.25, quant=QuantSpec(bits=8, granularity=PER_CHANNEL)))])


def test_plans_first_match_wins_and_unclaimed_kernels_stay():
    plans = RECIPE.plans(PARAMS)
    assert plans["layer_0"]["mlp"]["kernel"].quant.bits == 4
    assert plans["layer_1"]["mlp"]["kernel"].quant.bits == 4
    assert plans["layer_0"]["attn"]["kernel"].quant.bits == 8
    assert plans["layer_1"]["attn"]["kernel"] is None and plans["layer_0"]["mlp"]["bias"] is None


def test_a_rule_that_claims_nothing_names_itself_and_the_candidates():
    with pytest.raises(ValueError, match=r"recipe: pattern 'layer_9/.\*' matches no leaf.*layer_0/attn/kernel"):
        Recipe([Rule("layer_9/.*", Plan(sparsity=0.5))]).plans(PARAMS)


def test_typed_plans_reject_bad_values():
    with pytest.raises(ValueError, match="sparsity"):
        Plan(sparsity=1.5)
    with pytest.raises(TypeError, match="sparsity"):
        Plan(sparsity=True)
    with pytest.raises(TypeError, match="quant"):
        Plan(quant="int8")
    with pytest.raises(TypeError, match="GPTQ"):
        jb.GPTQ(jb.quant.Binary())
    with pytest.raises(TypeError, match="Rule"):
        Recipe([("layer_0", Plan())])
    assert Plan(sparsity=np.float32(0.5)).pruner == jb.Magnitude(np.float32(0.5))


def test_apply_prunes_by_magnitude_then_quantizes_the_survivors():
    out = RECIPE.apply(PARAMS)
    for i in range(2):
        w = np.asarray(PARAMS[f"layer_{i}"]["mlp"]["kernel"])
        q = out[f"layer_{i}"]["mlp"]["kernel"]
        assert q.bits == 4
        dense = np.asarray(q.dense())
        # 2:4 along the input axis, keeping the two largest |w| of each group of four (numpy reference)
        groups = np.abs(w).T.reshape(32, 4, 4)
        keep = np.argsort(-groups, axis=-1)[..., :2]
        expected = np.zeros_like(groups, bool)
        np.put_along_axis(expected, keep, True, axis=-1)
        kept = expected.reshape(32, 16).T
        assert (dense[~kept] == 0).all()
        step = np.abs(w * kept).max() / 7                          # int4 symmetric absmax of the survivors
        assert np.abs(dense - w * kept).max() <= step / 2 + 1e-6
    attn = out["layer_0"]["attn"]["kernel"]
    assert attn.bits == 8 and float((attn.dense() == 0).mean()) == 0.25
    kept = 16 * 16 - 64                              # one leaf: a bit per weight + kept int8 codes + 16 scales
    assert attn.nbytes == 16 * 16 // 8 + kept + 4 * 16, attn.nbytes
    assert out["layer_1"]["attn"]["kernel"] is PARAMS["layer_1"]["attn"]["kernel"]
    assert out["layer_0"]["mlp"]["bias"] is PARAMS["layer_0"]["mlp"]["bias"]


def test_apply_refuses_methods_that_need_data():
    recipe = Recipe([Rule(".*", Plan(quant=jb.GPTQ(QuantSpec(bits=4))))])
    with pytest.raises(ValueError, match=r"layer_0/attn/kernel: GPTQ needs calibration data"):
        recipe.apply(PARAMS)


def test_report_shows_planned_beside_achieved():
    report = jb.report.summary(RECIPE.apply(PARAMS), recipe=RECIPE)
    rows = {r.path: r for r in report.rows}
    assert rows["layer_0/mlp/kernel"].planned == "magnitude 2:4 + rtn int4"
    assert rows["layer_0/attn/kernel"].planned == "magnitude 25% + rtn int8"
    assert rows["layer_1/attn/kernel"].planned is None
    assert "planned" in str(report) and "magnitude 2:4 + rtn int4" in report.to_markdown()


def test_for_training_keeps_planned_sparsity_and_trains_on_fake_quant_weights():
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jnp.tanh(x @ jax.random.normal(jax.random.key(2), (16, 32)))

    def apply_fn(p, x):
        h = x @ p["layer_0"]["attn"]["kernel"] @ p["layer_1"]["attn"]["kernel"]
        return h @ p["layer_0"]["mlp"]["kernel"] + p["layer_0"]["mlp"]["bias"]

    tx, forward = RECIPE.for_training(optax.adam(1e-2), apply_fn, PARAMS)
    loss = lambda p: jnp.mean((forward(p, x) - y) ** 2)
    step = jax.jit(lambda p, s: (lambda g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))(
        jax.grad(loss)(p)))
    params, state = PARAMS, tx.init(PARAMS)
    first = loss(params)
    for _ in range(30):
        params, state = step(params, state)
    assert loss(params) < 0.5 * first
    mlp = np.asarray(params["layer_0"]["mlp"]["kernel"])
    assert ((mlp != 0).reshape(4, 4, 32).sum(axis=1) <= 2).all()          # 2:4 along the input axis
    assert float((params["layer_0"]["attn"]["kernel"] == 0).mean()) == 0.25
    assert float((params["layer_1"]["attn"]["kernel"] == 0).mean()) == 0.0  # no plan: untouched
    # forward runs the fake-quantized kernels: equal to the quantize-dequantize of the weights
    expected = apply_fn(jb.leaves.densify(RECIPE.apply(params)), x)
    np.testing.assert_allclose(forward(params, x), expected, rtol=1e-5, atol=1e-5)


def test_presets_leave_the_head_dense_and_quantize_every_other_kernel():
    params = {"layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.ones((8, 8))}}}}, "lm_head": {"kernel": jnp.ones((8, 4))}}
    plans = jb.recipe.preset("int8").plans(params)
    assert plans["lm_head"]["kernel"] is None
    assert plans["layers"]["0"]["mlp"]["up_proj"]["kernel"].quant.bits == 8
    for name in jb.recipe.PRESETS:
        assert jb.recipe.preset(name).plans(params)["lm_head"]["kernel"] is None


_PRUNERS = {"magnitude": jb.Magnitude, "wanda": jb.Wanda, "sparsegpt": jb.SparseGPT}


def _expected_pruner(part, description):
    """``wanda-50`` -> Wanda(0.5) (the description says "unstructured"), ``sparsegpt-2:4`` -> NM(2, 4)."""
    m = re.fullmatch(r"(magnitude|wanda|sparsegpt)-(\d+)(?::(\d+))?", part)
    if m is None:
        return None
    method, a, b = m.groups()
    if b is not None:
        assert f"{a}:{b}" in description
        return method, jb.sparsity.NM(int(a), int(b))
    assert f"{a}%" in description
    return method, int(a) / 100


def _expected_quant(part, description):
    """``gptq-int3`` -> GPTQ, 3 bits; ``gptq-q4_0`` -> GGUF's Q4_0 grid, 4 bits; ``awq-int4`` -> RTN, 4 bits
    (under AWQ); granularity, calibration and scale dtype as the description states them."""
    m = re.fullmatch(r"(?:(gptq|rtn|awq|smoothquant)-)?(?:int(\d)|q(\d)_0|w(\d)a8)", part)
    if m is None:
        return None
    method = "rtn" if m.group(1) in (None, "awq", "smoothquant") else m.group(1)
    bits = int(m.group(2) or m.group(3) or m.group(4))
    assert f"int{bits}" in description
    group = re.search(r"groups of (\d+)|\bg(\d+)\b", description)
    if group:
        granularity = jb.quant.Group(int(group.group(1) or group.group(2)))
    else:
        assert "per output channel" in description, description
        granularity = PER_CHANNEL
    calibration = jb.quant.MSE() if "MSE" in description else QuantSpec(bits=bits).calibration
    scale_dtype = "float16" if "float16 scales" in description else None
    activations = QuantSpec(bits=8, granularity=jb.quant.PER_TOKEN) if "inputs int8 per token" in description else None
    return method, QuantSpec(bits=bits, granularity=granularity, calibration=calibration, scale_dtype=scale_dtype,
                             activations=activations)


def _expected_migration(part, description):
    """``awq`` / ``awq-int4`` -> AWQ with the grid the description states; ``smoothquant-...`` -> its alpha."""
    m = re.match(r"(awq|smoothquant)\b", part)
    if m is None:
        return None
    if m.group(1) == "awq":
        grid = re.search(r"AWQ scales \((\d+)-point grid", description)
        assert grid, description
        return jb.AWQ, "grid", int(grid.group(1))
    alpha = re.search(r"SmoothQuant alpha ([\d.]+)", description)
    assert alpha, description
    return jb.SmoothQuant, "alpha", float(alpha.group(1))


@pytest.mark.parametrize("name", list(jb.recipe.PRESETS))
def test_every_preset_is_what_its_name_and_description_say(name):
    _, description = jb.recipe.PRESETS[name]
    params = {"layers": {"0": {"mlp": {"kernel": jnp.ones((256, 8))}}}}
    plan = jb.recipe.preset(name).plans(params)["layers"]["0"]["mlp"]["kernel"]
    pruner = quant = migration = None
    for part in name.split("+"):
        # a part named like a preset ("...+gptq-int4") is also what that preset's description says
        said = " ".join([description, jb.recipe.PRESETS[part][1] if part in jb.recipe.PRESETS else ""])
        pruner = pruner or _expected_pruner(part, said)
        quant = quant or _expected_quant(part, said)
        migration = migration or _expected_migration(part, said)
        assert _expected_pruner(part, said) or _expected_quant(part, said) or _expected_migration(part, said), \
            f"unread part {part!r} of {name!r}"
    if migration is not None:   # the migration wraps the quantizer the rest of the name says
        cls, option, value = migration
        assert isinstance(plan.quantizer, cls) and getattr(plan.quantizer, option) == value, plan.quantizer
        plan = jb.Plan(sparsity=plan.sparsity, quant=plan.quantizer.quant)
    if pruner is None:
        assert plan.pruner is None
    else:
        assert isinstance(plan.pruner, _PRUNERS[pruner[0]]) and plan.pruner.sparsity == pruner[1], plan.pruner
    if quant is None:
        assert plan.quantizer is None
    else:
        assert isinstance(plan.quantizer, {"gptq": jb.GPTQ, "rtn": jb.RTN}[quant[0]]), plan.quantizer
        assert plan.quantizer.spec == quant[1], (plan.quantizer.spec, quant[1])


def test_recipe_file_parses_into_the_typed_recipe(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('''
[[rule]]
pattern = "layers/\\\\d+/mlp/.*"
sparsity = 0.5
prune = "wanda"
[rule.quant]
bits = 3
group = 64
calibration = "mse"
method = "gptq"
act_order = true

[[rule]]
pattern = ".*"
[rule.quant]
bits = 8
granularity = "channel"
''')
    recipe = jb.recipe.load(path)
    first, second = (r.value for r in recipe.rules)
    assert recipe.rules[0].pattern == r"layers/\d+/mlp/.*"
    assert first.sparsity == jb.Wanda(0.5)
    assert first.quant == jb.GPTQ(QuantSpec(bits=3, granularity=jb.quant.Group(64), calibration=jb.quant.MSE()),
                                  act_order=True)
    assert second == Plan(quant=jb.RTN(QuantSpec(bits=8, granularity=PER_CHANNEL)))


def test_recipe_file_keeps_every_rule_however_its_header_is_written(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[[rule]]  # the MLPs\npattern = "a"\nsparsity = 0.5\n\n'
                    '[[ rule ]]\npattern = ".*"\n[rule.quant]\nbits = 4\n')
    rules = jb.recipe.load(path).rules  # one of them was dropped without a word
    assert [(r.pattern, r.value.describe()) for r in rules] == [("a", "magnitude 50%"), (".*", "rtn int4")]


def test_recipe_file_quant_keys_left_out_mean_the_python_defaults(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[[rule]]\npattern = "a"\n[rule.quant]\nbits = 4\n\n'
                    '[[rule]]\npattern = "b"\n[rule.quant]\nsymmetric = false\ngroup = 32\n')
    first, second = (r.value.quant for r in jb.recipe.load(path).rules)
    assert first == jb.RTN(QuantSpec(bits=4))
    assert second == jb.RTN(QuantSpec(symmetric=False, granularity=jb.quant.Group(32)))


def test_recipe_file_spells_migrations_before_their_quantizer(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[[rule]]\npattern = "a"\n[rule.quant]\nbits = 4\ngroup = 128\nmethod = "awq"\n\n'
                    '[[rule]]\npattern = "b"\n[rule.quant]\nbits = 4\nmethod = "awq+gptq"\ngrid = 8\n'
                    'act_order = true\n\n'
                    '[[rule]]\npattern = "c"\n[rule.quant]\nbits = 8\ngranularity = "channel"\n'
                    'method = "smoothquant"\nalpha = 0.75\n')
    a, b, c = (r.value.quant for r in jb.recipe.load(path).rules)
    assert a == jb.AWQ(QuantSpec(bits=4, granularity=jb.quant.Group(128)))
    assert b == jb.AWQ(jb.GPTQ(QuantSpec(bits=4), act_order=True), grid=8)
    assert c == jb.SmoothQuant(QuantSpec(bits=8, granularity=PER_CHANNEL), alpha=0.75)


@pytest.mark.parametrize("body, line, message", [
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nmethod = "gptq+awq"\n', 4, "optionally after migrations"),
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nmethod = "gptq"\nalpha = 0.5\n', 5, "SMOOTHQUANT options"),
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nmethod = "awq"\ngrid = 0\n', 5, "AWQ.grid"),
    ('[[rule]]\npattern = ".*"\nsparsty = 0.5\n', 3, "unknown key 'sparsty' in [[rule]]"),
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nbits = 4\nmetod = "gptq"\n', 5, "unknown key 'metod' in [rule.quant]"),
    ('[[rule]]\npattern = ".*"\n\n[[rule]]\npattern = "a"\n[rule.quant]\nbits = 9\n', 7, "bits must be an int in"),
    ('[[rule]]\npattern = ".*"\nsparsity = "2-4"\n', 3, "'n:m'"),
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nmethod = "rtn"\nact_order = true\n', 5, "GPTQ options"),
    ('[[rule]]\npattern = ".*"\nsparsity = 1.5\nrequired = true\n', 3, "sparsity"),
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nbits = 4\ncalibration = "max"\n', 5, "calibration must be one of"),
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nmethod = "gptq"\ndamp = 0\n', 5, "damp"),
    ('[[rule]]\npattern = ".*"\n[rule.quant]\nbits = 4\nsymmetric = 1\n', 5, "symmetric must be a bool"),
    ('[[rules]]\npattern = ".*"\n', None, "[[rule]] tables only"),
    ('[[rule]]\npattern = "a"\nquant = { bits = 4, bitz = 3 }\n', 3, "unknown key 'bitz' in [rule.quant]"),
    ('[[rule]]\npattern = "a"\nquant.bits = 4\nquant.methd = "gptq"\n', 4, "unknown key 'methd' in [rule.quant]"),
    ('[[rule]]  # attention\npattern = "a"\n\n[[ rule ]]\npattern = "b"\nsparsty = 0.5\n', 6,
     "unknown key 'sparsty' in [[rule]]"),
])
def test_recipe_file_errors_name_the_file_line_and_key(tmp_path, body, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(jb.recipe.RecipeFileError) as e:
        jb.recipe.load(path)
    text = str(e.value)
    assert text.startswith(f"{path}:{line}: " if line else f"{path}: ") and message in text, text
