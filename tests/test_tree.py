import collections

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxopt_big as jb

PARAMS = {"params": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
                     "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)}}}


def test_paths_linen_dict():
    assert jb.tree.paths(PARAMS) == ["params/Conv_0/bias", "params/Conv_0/kernel",
                                     "params/Dense_0/bias", "params/Dense_0/kernel"]


def test_paths_lists_tuples_namedtuples():
    Pair = collections.namedtuple("Pair", "w b")
    tree = {"layers": [Pair(jnp.ones((2, 2)), jnp.ones(2)), (jnp.ones(1),)]}
    assert jb.tree.paths(tree) == ["layers/0/w", "layers/0/b", "layers/1/0"]


def test_paths_nnx_state_drop_variable_value():
    state = nnx.state(jb.models.NnxMLP(4, (3,), 2, rngs=nnx.Rngs(0)), nnx.Param)
    assert jb.tree.paths(state) == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
    assert jax.tree.leaves(jb.tree.select(state)) == [False, True, False, True]


def test_select_default_kernels_requires_ndim_2():
    tree = {"a": {"kernel": jnp.ones(3), "weight": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    assert jb.tree.select(tree) == {"a": {"kernel": False, "weight": True}, "b": {"kernel": True}}


def test_select_regex_is_fullmatch_and_list_is_union():
    sel = jb.tree.select(PARAMS, "params/Dense_0/.*")
    assert jax.tree.leaves(sel) == [False, False, True, True]
    assert jax.tree.leaves(jb.tree.select(PARAMS, "Dense_0/kernel|params/Dense_0/kernel")) == [False, False, False, True]
    sel = jb.tree.select(PARAMS, [".*Conv_0/bias", ".*Dense_0/kernel"])
    assert jax.tree.leaves(sel) == [True, False, False, True]


def test_select_callable_and_bool_tree():
    sel = jb.tree.select(PARAMS, lambda p, x: x.size == 4)
    assert jax.tree.leaves(sel) == [False, False, True, False]
    again = jb.tree.select(PARAMS, sel)
    assert again == sel


def test_select_regex_matching_nothing_lists_paths():
    with pytest.raises(ValueError, match="matches no leaf.*params/Dense_0/kernel"):
        jb.tree.select(PARAMS, "Dense_7/.*")
    with pytest.raises(ValueError, match="'nothing'"):
        jb.tree.select(PARAMS, [".*kernel", "nothing"])


def test_select_invalid_regex_named():
    with pytest.raises(ValueError, match=r"invalid regex '\(unclosed'"):
        jb.tree.select(PARAMS, "(unclosed")


def test_every_pattern_is_compiled_by_one_compiler_that_names_its_option():
    with pytest.raises(ValueError, match=r"^blocks: invalid regex '\(': missing \)"):
        jb.tree.compile_pattern("(", what="blocks")
    with pytest.raises(TypeError, match=r"^blocks: selection pattern must be a str regex, got 3"):
        jb.tree.compile_pattern(3, what="blocks")
    with pytest.raises(ValueError, match=r"^Rule: invalid regex '\['"):
        jb.tree.Rule("[", 4)


def test_patterns_each_must_match_a_path_seen():
    pick = jb.tree.Patterns([r"layer_\d+/mlp", "head"], what="where")
    assert [pick(p) for p in ("layer_0/mlp/up", "layer_0/mlp_norm", "head")] == [True, False, True]
    pick.check()
    missing = jb.tree.Patterns(["head", "tail"], what="where")
    missing("head")
    with pytest.raises(ValueError, match=r"^where: pattern 'tail' matches no leaf; available paths: \[head\]$"):
        missing.check()


def test_select_bool_tree_of_other_structure():
    with pytest.raises(ValueError, match="structure"):
        jb.tree.select(PARAMS, {"params": {"Dense_0": {"kernel": True}}})


def test_rules_first_match_wins_and_none_elsewhere():
    vals = jb.tree.rules(PARAMS, [jb.tree.Rule(".*Dense_0/kernel", 4), jb.tree.Rule(".*kernel", 8)])
    assert vals["params"]["Dense_0"]["kernel"] == 4
    assert vals["params"]["Conv_0"]["kernel"] == 8
    assert vals["params"]["Dense_0"]["bias"] is None


def test_rules_unused_rule_and_bad_input():
    with pytest.raises(ValueError, match="'.*Dense_0/kernel'"):  # shadowed by the earlier rule
        jb.tree.rules(PARAMS, [jb.tree.Rule(".*kernel", 8), jb.tree.Rule(".*Dense_0/kernel", 4)])
    with pytest.raises(ValueError, match="invalid regex"):
        jb.tree.Rule("[", 1)
    with pytest.raises(TypeError, match="sequence of jb.tree.Rule"):
        jb.tree.rules(PARAMS, ".*")


def test_rule_pairs_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="jb.tree.Rule"):
        vals = jb.tree.rules(PARAMS, [(".*Dense_0/kernel", 4)])
    assert vals["params"]["Dense_0"]["kernel"] == 4 and vals["params"]["Conv_0"]["kernel"] is None


def test_path_rules_stream_the_same_semantics_as_assign():
    pick = jb.tree.PathRules([jb.tree.Rule("Dense_0", 4), jb.tree.Rule("Conv_0/kernel", 8)], what="bits")
    assert [pick(p) for p in ("Dense_0/kernel", "Conv_0/kernel", "Conv_0/bias")] == [4, 8, None]
    pick.check()
    unused = jb.tree.PathRules([jb.tree.Rule("Dense_9", 4)], what="bits")
    unused("Dense_0/kernel")
    with pytest.raises(ValueError, match=r"^bits: pattern 'Dense_9' matches no leaf; available paths: \[Dense_0/kernel\]$"):
        unused.check()


def test_map_selected_only_touches_selection():
    out = jb.tree.map_selected(lambda p, x: -x, PARAMS)
    assert float(out["params"]["Dense_0"]["kernel"].sum()) == -12.0
    assert float(out["params"]["Dense_0"]["bias"].sum()) == 4.0
    with pytest.raises(ValueError, match="matches no leaf"):
        jb.tree.map_selected(lambda p, x: x, {"b": jnp.ones(2)})


@pytest.mark.parametrize("required", ["no", 0, None])
def test_rule_required_must_be_a_bool(required):
    with pytest.raises(TypeError, match=r"Rule\('mlp'\)\.required must be a bool"):
        jb.tree.Rule("mlp", 4, required=required)
    assert jb.tree.Rule("mlp", 4, required=False).required is False


def test_recipe_file_required_must_be_a_bool(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('[[rule]]\npattern = ".*"\nsparsity = 0.5\nrequired = "no"\n')
    with pytest.raises(jb.recipe.RecipeFileError, match="required must be a bool, got 'no'"):
        jb.recipe.load(f)
