"""The Flax BERT and its loader against an independent numpy forward pass of the same weights.

The suite has no pretrained weights, so a small random BERT is saved to a temporary safetensors
directory and read back; ``benchmarks/transformer.py`` runs :func:`numpy_bert` on the real
all-MiniLM-L6-v2 weights.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.special import erf

import jaxopt_big as jb
from jaxopt_big import calibration, zoo
from jaxopt_big import sparsity as sp


def numpy_bert(tensors, config, ids, mask):
    """Sentence embeddings from Hugging Face BERT tensors (torch layout), in float64 numpy."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    heads = config["num_attention_heads"]
    eps = config["layer_norm_eps"]

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    b, n = ids.shape
    x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:n]
         + t["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(x, p + f"attention.self.{s}").reshape(b, n, heads, -1).transpose(0, 2, 1, 3)
                   for s in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + bias
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
        x = norm(x + linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = norm(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


CONFIG = zoo.BertConfig(vocab_size=40, hidden=32, layers=2, heads=4, intermediate=64, max_positions=16)
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "fast", "slow", "red", "blue", "big", "##s", "##ing"]
SENTENCES = ["the cat sat on the mat", "a dog ran fast", "the big red dogs", "a slow blue cat sat",
             "the cats ran on a mat", "big dogs sat"]


def random_bert_dir(path, seed=0):
    """A random BERT saved as config.json + model.safetensors, with a tiny WordPiece tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    params = zoo.Bert(CONFIG).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)))["params"]
    # give LayerNorms non-trivial values so the loader's mapping of them is tested
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if x.ndim == 1 else x, params)
    zoo.save_bert(path, CONFIG, params)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))
    return params


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    random_bert_dir(path)
    model, params = zoo.load_bert(path)
    ids, mask = zoo.tokenize(zoo.load_tokenizer(path / "tokenizer.json", length=12), SENTENCES)
    return path, model, params, ids, mask


def test_tokenizer_pads_and_wraps(bert):
    _, _, _, ids, mask = bert
    assert ids.shape == mask.shape == (len(SENTENCES), 12) and ids.dtype == np.int32
    assert (ids[:, 0] == 2).all()
    lengths = mask.sum(1)
    np.testing.assert_array_equal(ids[np.arange(len(ids)), lengths - 1], 3)  # [SEP] closes each sentence
    np.testing.assert_array_equal(lengths, [8, 6, 7, 7, 9, 6])  # "dogs" -> dog ##s, "cats" -> cat ##s
    assert (ids[mask == 0] == 0).all()


def test_flax_bert_matches_numpy_forward(bert):
    path, model, params, ids, mask = bert
    ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    ref = numpy_bert(load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text()),
                     ids, mask)
    cosine = (ours * ref).sum(-1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_padding_does_not_change_embeddings(bert):
    _, model, params, ids, mask = bert
    longer = np.pad(ids, ((0, 0), (0, 4))), np.pad(mask, ((0, 0), (0, 4)))
    np.testing.assert_allclose(model.apply({"params": params}, *longer), model.apply({"params": params}, ids, mask),
                               atol=1e-5)


def test_loader_reports_missing_and_misshapen_tensors(tmp_path):
    random_bert_dir(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    good = dict(tensors)
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.weight.*layer_1/output/kernel.*missing"):
        zoo.load_bert(tmp_path)
    good["encoder.layer.0.intermediate.dense.weight"] = good["encoder.layer.0.intermediate.dense.weight"].T.copy()
    save_file(good, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layer_0/intermediate/kernel: tensor .* has shape"):
        zoo.load_bert(tmp_path)
    with pytest.raises(ValueError, match="hidden=30 is not divisible by heads=4"):
        zoo.BertConfig(hidden=30, heads=4)


def test_calibrating_bert_skips_padding_and_sparsegpt_beats_magnitude(bert):
    _, model, params, ids, mask = bert
    variables = {"params": params}
    _, stats = calibration.sequential(model.apply, variables, [(ids, mask)], where=r"layer_0/attention/\w+",
                                      row_mask=lambda batch: batch[1])
    assert list(stats) == [f"layer_0/attention/{n}" for n in ("query", "key", "value", "output")]
    assert float(stats["layer_0/attention/query"].count) == mask.sum()
    # the query layer's input is the embedding LayerNorm output at the real tokens
    e = (np.asarray(params["word_embeddings"]["embedding"])[ids] + np.asarray(params["position_embeddings"]["embedding"])
         [:ids.shape[1]] + np.asarray(params["token_type_embeddings"]["embedding"])[0])
    e = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + CONFIG.eps)
    e = e * np.asarray(params["embeddings_norm"]["scale"]) + np.asarray(params["embeddings_norm"]["bias"])
    rows = e[mask > 0]
    np.testing.assert_allclose(np.asarray(stats["layer_0/attention/query"].hessian), rows.T @ rows, rtol=1e-4,
                               atol=1e-3)

    def compress(path, kernel, s):
        return sp.sparsegpt_kernel(kernel, s.hessian, 0.5, block_size=16, path=path)
    pruned, _ = calibration.sequential(model.apply, variables, [(ids, mask)], compress, row_mask=lambda b: b[1])
    magnitude = jax.tree_util.tree_map_with_path(
        lambda p, w: jnp.where(jnp.abs(w) >= jnp.median(jnp.abs(w), axis=0), w, 0) if p[-1].key == "kernel" else w,
        params)
    base = model.apply(variables, ids, mask)
    cos = lambda v: float((model.apply(v, ids, mask) * base).sum(-1).mean())  # noqa: E731
    assert cos(pruned) > cos({"params": magnitude}), (cos(pruned), cos({"params": magnitude}))


def test_sharded_bert_loads_like_the_single_file(bert, tmp_path):
    path, _, params, _, _ = bert
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({k: tensors[k] for k in members}, str(tmp_path / shard))
    weight_map = {k: shard for shard, members in shards.items() for k in members}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, loaded = zoo.load_bert(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    config = json.loads((path / "config.json").read_text())
    del config["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: required field 'num_attention_heads' is missing"):
        zoo.load_bert(tmp_path)


def test_tensors_without_a_place_in_the_model_are_refused(bert, tmp_path):
    path, *_ = bert
    tensors = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))   # would drop layer 1
    with pytest.raises(ValueError, match=r"'encoder\.layer\.1\..*have no place in the model"):
        zoo.load_bert(tmp_path)
    head = {"classifier.weight": np.ones((2, 32), np.float32), "pooler.dense.bias": np.ones(32, np.float32),
            "embeddings.position_ids": np.arange(16, dtype=np.int64)[None]}
    save_file({**tensors, **head}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['classifier\.weight'\] have no place"):   # pooler, position_ids: known
        zoo.load_bert(tmp_path)


def test_llama_config_names_a_bad_field_with_its_type():
    with pytest.raises(TypeError, match=r"LlamaConfig.hidden_size must be an int, got 32.5"):
        jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32.5, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64)
    with pytest.raises(TypeError, match=r"LlamaConfig.attention_bias must be a bool, got 'false'"):
        jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, attention_bias="false")
