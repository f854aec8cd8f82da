"""Mixed precision: sensitivity, exact knapsack allocation (vs brute force), budget, digits comparison."""

import itertools

import digits_util as du
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_big as jb
from jaxopt_big.quant import (PER_CHANNEL, QuantSpec, allocate_bits, allocation_rules, layer_bytes,
                               quantize_params, sensitivity)

BITS = (2, 3, 4, 8)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(n_layers=st.integers(1, 4), seed=st.integers(0, 10_000), slack=st.floats(0.0, 1.0))
def test_allocation_is_the_brute_force_optimum_and_never_exceeds_the_budget(n_layers, seed, slack):
    rng = np.random.default_rng(seed)
    sizes = {f"l{i}": int(rng.integers(1, 200)) for i in range(n_layers)}
    sens = {p: dict(zip(BITS, np.sort(rng.exponential(1.0, 4))[::-1].tolist())) for p in sizes}
    cost = lambda p, b: -(-sizes[p] * b // 8)
    lo, hi = sum(cost(p, 2) for p in sizes), sum(cost(p, 8) for p in sizes)
    budget = int(lo + slack * (hi - lo))
    got = allocate_bits(sens, sizes, budget)
    assert sum(cost(p, b) for p, b in got.items()) <= budget
    best = min(sum(sens[p][b] for p, b in zip(sizes, combo)) for combo in itertools.product(BITS, repeat=n_layers)
               if sum(cost(p, b) for p, b in zip(sizes, combo)) <= budget)
    np.testing.assert_allclose(sum(sens[p][b] for p, b in got.items()), best, rtol=1e-9, atol=1e-12)


def test_budget_below_smallest_model_and_mismatched_paths_fail_with_values():
    sens = {"a/kernel": {2: 1.0, 8: 0.0}}
    with pytest.raises(ValueError, match=r"budget_bytes=3 .* 4 bytes"):
        allocate_bits(sens, {"a/kernel": 16}, 3)
    with pytest.raises(ValueError, match="b/kernel"):
        allocate_bits(sens, {"a/kernel": 16, "b/kernel": 4}, 100)
    with pytest.raises(ValueError, match=r"a/kernel.*nan"):
        allocate_bits({"a/kernel": {2: float("nan")}}, {"a/kernel": 16}, 100)


def test_sensitivity_is_the_loss_increase_of_one_layer_quantized():
    w = {"a": {"kernel": jnp.array([[0.3, 1.0], [-0.7, 0.2]])}, "b": {"kernel": jnp.eye(2)}}
    x = jnp.array([[1.0, 2.0]])
    loss = lambda p, x: ((x @ p["a"]["kernel"] @ p["b"]["kernel"]) ** 2).sum()
    got = sensitivity(loss, w, x, bits=(2,), spec=QuantSpec(bits=8))
    qa = np.array([[0.0, 1.0], [-1.0, 0.0]])  # per-tensor 2-bit absmax grid {-1, 0, 1}
    np.testing.assert_allclose(got["a/kernel"][2], ((np.array([1.0, 2.0]) @ qa) ** 2).sum() - float(loss(w, x)),
                               rtol=1e-5)
    assert got["b/kernel"][2] == 0.0  # the identity is on the grid


def test_layer_bytes_and_rules_feed_quantize_params():
    p = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((16, 4))}}
    sizes = layer_bytes(p, bits=(2, 4))
    rules = allocation_rules({"a/kernel": 2, "b/kernel": 4})
    q = quantize_params(p, rules)
    assert q["a"]["kernel"].bits == 2 and q["b"]["kernel"].bits == 4
    assert jb.leaves.nbytes(q) == sizes["a/kernel"][2] + sizes["b/kernel"][4]


def test_sensitivity_allocation_beats_uniform_two_bit_and_random_allocations_on_digits(digits):
    _, apply, params, dense_acc = du.dense_cnn()
    train, test = digits
    loss = jb.train.classifier_loss(apply)
    calib = (jnp.asarray(train.x[:512]), jnp.asarray(train.y[:512]))
    sens = sensitivity(loss, params, calib, bits=BITS)
    sizes = layer_bytes(params, bits=BITS)
    budget = int(1.25 * sum(s[2] for s in sizes.values()))
    alloc = allocate_bits(sens, sizes, budget)
    used = sum(sizes[p][b] for p, b in alloc.items())
    assert used <= budget

    def acc(allocation):
        return du.accuracy(apply, jb.leaves.densify(quantize_params(params, allocation_rules(allocation))), test)

    uniform = acc({p: 2 for p in sizes})
    # Random allocations spending between 80% and 100% of the same budget.
    fitting = [dict(zip(sizes, c)) for c in itertools.product(BITS, repeat=len(sizes))
               if 0.8 * budget <= sum(sizes[p][b] for p, b in zip(sizes, c)) <= budget]
    rng = np.random.default_rng(0)
    randoms = [acc(fitting[i]) for i in rng.choice(len(fitting), 3, replace=False)]
    ours = acc(alloc)
    print(f"digits CNN budget {budget} B (uniform 2-bit + 25%): allocation {alloc} ({used} B) acc {ours:.4f}; "
          f"uniform 2-bit {uniform:.4f}; random {np.round(randoms, 4).tolist()} (mean {np.mean(randoms):.4f}); "
          f"float {dense_acc:.4f}")
    assert ours > uniform and ours > np.mean(randoms)
