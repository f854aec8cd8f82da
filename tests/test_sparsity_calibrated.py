"""Wanda, SparseGPT and sequential calibration against numpy references of the same algorithms."""


import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_big import calibration
from jaxopt_big import sparsity as sp

from jaxopt_big.sparsity import NM  # noqa: E402


# ---- numpy references, written from the papers -------------------------------------------------

def np_wanda(kernel, norms, sparsity):
    """Per output: drop the round(s * d_in) inputs with the lowest |W| * ||X||."""
    out = kernel.copy()
    k = int(round(sparsity * kernel.shape[0]))
    for o in range(kernel.shape[1]):
        scores = np.abs(kernel[:, o]) * norms
        out[np.argsort(scores, kind="stable")[:k], o] = 0
    return out


def np_inverse_cholesky(h, damp):
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead  # upper U with U^T U = H^-1


def np_sparsegpt(kernel, hessian, sparsity, *, nm=None, block=128, damp=0.01):
    """Column-by-column OBS pruning with eager (not lazy) updates of all remaining columns."""
    u, dead = np_inverse_cholesky(hessian, damp)
    w = kernel.T.astype(np.float64).copy()
    w[:, dead] = 0
    rows, cols = w.shape
    mask = np.zeros_like(w, bool)
    for i in range(cols):
        if nm is None and i % block == 0:  # the block's mask, from the weights as updated so far
            j = min(i + block, cols)
            score = (w[:, i:j] ** 2 / np.diag(u)[i:j] ** 2).ravel()
            m = np.zeros(score.size, bool)
            m[np.argsort(score, kind="stable")[:int(round(sparsity * score.size))]] = True
            mask[:, i:j] = m.reshape(rows, j - i)
        if nm is not None and i % nm[1] == 0:
            score = w[:, i:i + nm[1]] ** 2 / np.diag(u)[i:i + nm[1]] ** 2
            for r in range(rows):
                mask[r, i + np.argsort(score[r], kind="stable")[:nm[1] - nm[0]]] = True
        q = np.where(mask[:, i], 0.0, w[:, i])
        err = (w[:, i] - q) / u[i, i]
        w[:, i:] -= np.outer(err, u[i, i:])
        w[:, i] = q
    return w.T


# ---- fixtures ----------------------------------------------------------------------------------

def correlated_inputs(n, d, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return (rng.normal(size=(n, d)) * np.linspace(0.2, 3.0, d)) @ mix


def layer_error(x, kernel, new):
    return float(np.sum((x @ np.asarray(new) - x @ kernel) ** 2))


X = correlated_inputs(256, 48).astype(np.float32)
W = np.random.default_rng(1).normal(size=(48, 24)).astype(np.float32)
H = (X.T @ X).astype(np.float32)


# ---- Wanda -------------------------------------------------------------------------------------

def test_wanda_matches_numpy_reference():
    norms = np.linalg.norm(X, axis=0)
    ours = sp.wanda_kernel(W, norms, 0.5)
    np.testing.assert_array_equal(np.asarray(ours), np_wanda(W, norms, 0.5))


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(m=st.sampled_from([2, 4, 8]), n=st.integers(1, 8), seed=st.integers(0, 100))
def test_nm_structure_is_valid_for_wanda_and_sparsegpt(m, n, seed):
    n = min(n, m)
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(24, 6)).astype(np.float32)  # fixed shapes: one compile per (n, m)
    x = rng.normal(size=(64, 24)).astype(np.float32)
    for out in (sp.wanda_kernel(kernel, np.linalg.norm(x, axis=0), structure=NM(n, m)),
                sp.sparsegpt_kernel(kernel, x.T @ x, structure=NM(n, m), block_size=24)):
        nonzero = (np.asarray(out) != 0).reshape(-1, m, 6).sum(axis=1)
        np.testing.assert_array_equal(nonzero, n)  # exactly n of every m kept (the data has no zeros)


# ---- SparseGPT ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [16, 48])
def test_sparsegpt_lazy_blocks_match_eager_numpy_reference(block):
    ours = np.asarray(sp.sparsegpt_kernel(W, H, 0.5, block_size=block))
    ref = np_sparsegpt(W, H, 0.5, block=block)
    np.testing.assert_array_equal(ours == 0, ref == 0)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=2e-3)
    assert (ours == 0).mean() == 0.5


def test_sparsegpt_nm_matches_numpy_reference():
    ours = np.asarray(sp.sparsegpt_kernel(W, H, structure=NM(2, 4), block_size=16))
    ref = np_sparsegpt(W, H, None, nm=(2, 4), block=16)
    np.testing.assert_array_equal(ours == 0, ref == 0)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=2e-3)


def test_dead_inputs_are_zeroed():
    x = X.copy()
    x[:, 3] = 0
    out = np.asarray(sp.sparsegpt_kernel(W, x.T @ x, 0.25))
    assert (out[3] == 0).all()
    assert np.isfinite(out).all()


def test_output_error_order_sparsegpt_wanda_magnitude():
    magnitude = np.where(np.abs(W) >= np.median(np.abs(W), axis=0, keepdims=True), W, 0)
    errors = {name: layer_error(X, W, k) for name, k in {
        "magnitude": magnitude,
        "wanda": sp.wanda_kernel(W, np.linalg.norm(X, axis=0), 0.5),
        "sparsegpt": sp.sparsegpt_kernel(W, H, 0.5)}.items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ---- sequential calibration on a random MLP ----------------------------------------------------

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(8)(x)


def np_mlp_inputs(params, x):
    """Inputs of each Dense layer, by a numpy forward pass."""
    inputs, h = [], x.astype(np.float64)
    for i in range(3):
        inputs.append(h)
        p = params[f"Dense_{i}"]
        h = h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
        h = np.maximum(h, 0) if i < 2 else h
    return inputs


def test_sequential_sparsegpt_on_mlp_matches_numpy_reference():
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(64, 16)).astype(np.float32) for _ in range(2)]
    variables = MLP().init(jax.random.key(0), batches[0])
    compress = lambda path, kernel, stats: sp.sparsegpt_kernel(kernel, stats.hessian, 0.5, block_size=16)
    new, stats = calibration.sequential(MLP().apply, variables, batches, compress)
    assert list(stats) == ["Dense_0", "Dense_1", "Dense_2"]

    # numpy: each layer's Hessian comes from the model with the earlier layers already pruned
    ref = jax.tree.map(np.asarray, variables["params"])
    x = np.concatenate(batches)
    for i in range(3):
        xi = np_mlp_inputs(ref, x)[i]
        np.testing.assert_allclose(np.asarray(stats[f"Dense_{i}"].hessian), xi.T @ xi, rtol=1e-4, atol=1e-2)
        assert float(stats[f"Dense_{i}"].count) == len(x)
        ref[f"Dense_{i}"] = dict(ref[f"Dense_{i}"], kernel=np_sparsegpt(ref[f"Dense_{i}"]["kernel"], xi.T @ xi, 0.5,
                                                                        block=16).astype(np.float32))
        ours = np.asarray(new["params"][f"Dense_{i}"]["kernel"])
        np.testing.assert_array_equal(ours == 0, ref[f"Dense_{i}"]["kernel"] == 0)
        np.testing.assert_allclose(ours, ref[f"Dense_{i}"]["kernel"], atol=5e-3, rtol=5e-3)


def test_wanda_tree_with_calibration_norms_and_row_mask():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 10, 16)), jnp.float32)
    row_mask = jnp.arange(10)[None, :] < jnp.array([[10], [4]])  # second example: 4 real rows
    variables = MLP().init(jax.random.key(0), x)
    _, stats = calibration.sequential(MLP().apply, variables, [x], where="Dense_0", row_mask=lambda b: row_mask)
    assert list(stats) == ["Dense_0"] and float(stats["Dense_0"].count) == 14
    rows = np.asarray(x)[np.asarray(row_mask)]
    np.testing.assert_allclose(np.asarray(stats["Dense_0"].norms), np.linalg.norm(rows, axis=0), rtol=1e-5)
    pruned = sp.wanda_params(variables, {p: s.norms for p, s in stats.items()}, 0.5)
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(pruned["params"]["Dense_0"]["kernel"]),
                                  np_wanda(kernel, np.linalg.norm(rows, axis=0), 0.5))
    assert pruned["params"]["Dense_1"]["kernel"] is variables["params"]["Dense_1"]["kernel"]


# ---- loud on bad input -------------------------------------------------------------------------

def test_bad_inputs_raise_naming_the_layer():
    with pytest.raises(ValueError, match="sparsity must be in"):
        sp.wanda_kernel(W, np.ones(48), 1.0, path="layer/kernel")
    with pytest.raises(ValueError, match="layer/kernel: input axis 48 is not divisible by m=5"):
        sp.sparsegpt_kernel(W, H, structure=NM(2, 5), path="layer/kernel")
    with pytest.raises(TypeError, match="structure must be"):
        sp.wanda_kernel(W, np.ones(48), structure="2:4")
    with pytest.raises(ValueError, match="hessian has shape"):
        sp.sparsegpt_kernel(W, H[:4, :4])
    with pytest.raises(ValueError, match="Dense_7: no kernel"):
        sp.sparsegpt_params({"Dense_0": {"kernel": W}}, {"Dense_7": H})
    variables = MLP().init(jax.random.key(0), X[:2, :16])
    with pytest.raises(ValueError, match=r"where: pattern .Dense_9. matches no leaf; available paths: \[Dense_0, Dense_1"):
        calibration.sequential(MLP().apply, variables, [X[:4, :16]], where=["Dense_0", "Dense_9"])
