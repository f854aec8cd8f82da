"""The embedded text corpus, its byte tokenizer and splits, and perplexity against numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big import data


def test_byte_tokenizer_round_trips_the_corpus_and_non_ascii():
    text = data.docs_text()
    assert len(text) > 300_000 and "def" in text
    ids = data.encode(text)
    assert ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < data.VOCAB_SIZE
    assert data.decode(ids) == text
    assert data.decode(data.encode("naïve — ünïcode ✓")) == "naïve — ünïcode ✓"
    with pytest.raises(ValueError, match="256"):
        data.decode([300])


def test_splits_are_fixed_disjoint_and_cover_the_text():
    splits = data.docs_corpus()
    again = data.docs_corpus()
    for a, b in zip(splits, again):
        np.testing.assert_array_equal(a, b)
    ids = data.encode(data.docs_text())
    # Reassemble the text from the three splits block by block: each byte is in exactly one split.
    block = np.arange(len(ids)) // 4096 % 20
    rebuilt = np.empty_like(ids)
    rebuilt[block == 9], rebuilt[block == 19] = splits.validation, splits.test
    rebuilt[(block != 9) & (block != 19)] = splits.train
    np.testing.assert_array_equal(rebuilt, ids)
    assert sum(map(len, splits)) == len(ids)
    assert 0.04 < len(splits.validation) / len(ids) < 0.06 and 0.04 < len(splits.test) / len(ids) < 0.06


def test_windows_batches_and_lm_pairs():
    tokens = np.arange(1000)
    seen = np.concatenate(list(data.token_batches(tokens, 4, 10, key=jax.random.key(0))))
    assert seen.shape == (100, 10) and sorted(seen[:, 0].tolist()) == list(range(0, 1000, 10))
    ds = data.lm_dataset(tokens, 9)
    np.testing.assert_array_equal(ds.y[:, :-1], ds.x[:, 1:])
    np.testing.assert_array_equal(ds.y[:, -1], ds.x[:, -1] + 1)
    with pytest.raises(ValueError, match="1-D"):
        data.windows(np.zeros((2, 3)), 2)


class _Bigram(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(data.VOCAB_SIZE)(nn.Embed(data.VOCAB_SIZE, 8)(ids))


def _numpy_perplexity(logits, ids, mask):
    logits = np.asarray(logits, np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    real = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    return float(np.exp(nll[real].mean()))


def test_perplexity_equals_numpy_for_linen_and_nnx():
    ids = data.windows(data.docs_corpus().validation, 16)[:11]  # 11 sequences: the last batch is padded
    mask = np.ones_like(ids)
    mask[3, 10:] = 0
    mask[7, :4] = 0
    params = _Bigram().init(jax.random.key(0), ids[:1])
    logits = _Bigram().apply(params, ids)
    ours = data.perplexity(lambda p, x, m: _Bigram().apply(p, x), params, ids, attention_mask=mask, batch_size=4)
    np.testing.assert_allclose(ours, _numpy_perplexity(logits, ids, mask), rtol=1e-5)
    np.testing.assert_allclose(data.perplexity(_Bigram().apply, params, ids, batch_size=4),
                               _numpy_perplexity(logits, ids, np.ones_like(ids)), rtol=1e-5)

    config = jb.zoo.LlamaConfig(vocab_size=256, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=24)
    model = jb.zoo.Llama(config, rngs=nnx.Rngs(0))
    ref = _numpy_perplexity(model(jnp.asarray(ids), jnp.asarray(mask)), ids, mask)
    np.testing.assert_allclose(data.perplexity(model, None, ids, attention_mask=mask, batch_size=4), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_mask shape"):
        data.perplexity(model, None, ids, attention_mask=mask[:, :3])
