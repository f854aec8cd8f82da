"""The nnx Llama and its Hugging Face loader against an independent numpy forward pass.

Small random checkpoints are written in the Hugging Face layout by the test's own numpy code (not by
``save_llama``), for the three families: llama (grouped-query attention, untied head), qwen2 (q/k/v
biases, tied embeddings) and mistral (a sliding window shorter than the sequence).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxopt_big import zoo

BASE = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
CONFIGS = {
    "llama": {**BASE, "model_type": "llama", "num_key_value_heads": 2, "rope_theta": 10000.0,
              "tie_word_embeddings": False},
    "qwen2": {**BASE, "model_type": "qwen2", "num_key_value_heads": 1, "rope_theta": 1e6,
              "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 4},
    "mistral": {**BASE, "model_type": "mistral", "num_key_value_heads": 2, "rope_theta": 500.0,
                "tie_word_embeddings": False, "sliding_window": 4},
}
LENGTH = 10  # longer than the mistral window


def hf_tensors(cfg, seed=0):
    """Random tensors with Hugging Face names and torch layouts ((out, in) Linear weights)."""
    rng = np.random.default_rng(seed)
    h, inter, heads, kv = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads"))
    d = h // heads
    normal = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": normal(cfg["vocab_size"], h),
         "model.norm.weight": 1 + normal(h)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = normal(cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
                  "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
                  "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
        for name, shape in shapes.items():
            t[p + name + ".weight"] = normal(*shape)
            if cfg["model_type"] == "qwen2" and name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                t[p + name + ".bias"] = normal(shape[0])
        t[p + "input_layernorm.weight"] = 1 + normal(h)
        t[p + "post_attention_layernorm.weight"] = 1 + normal(h)
    return t


def write_checkpoint(directory, cfg, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def numpy_llama(tensors, cfg, ids, mask=None):
    """Logits in float64 numpy: RoPE as rotations of (i, i + d/2) pairs, GQA by repeating kv heads."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
    b, n = ids.shape
    mask = np.ones((b, n)) if mask is None else mask

    def rms(x, name):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg["rms_norm_eps"]) * t[name]

    def linear(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    angle = np.arange(n)[:, None] * cfg["rope_theta"] ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(x):  # (b, heads, n, d)
        a, c = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - c * sin, c * cos + a * sin], -1)

    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    allowed = allowed[None, None] & (mask[:, None, None, :] > 0)
    x = t["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        y = rms(x, p + "input_layernorm.weight")
        split = lambda z, k: z.reshape(b, n, k, d).transpose(0, 2, 1, 3)  # noqa: E731
        q = rope(split(linear(y, p + "self_attn.q_proj"), heads))
        k = np.repeat(rope(split(linear(y, p + "self_attn.k_proj"), kv)), heads // kv, axis=1)
        v = np.repeat(split(linear(y, p + "self_attn.v_proj"), kv), heads // kv, axis=1)
        s = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + linear((a @ v).transpose(0, 2, 1, 3).reshape(b, n, -1), p + "self_attn.o_proj")
        y = rms(x, p + "post_attention_layernorm.weight")
        g = linear(y, p + "mlp.gate_proj")
        x = x + linear(g / (1 + np.exp(-g)) * linear(y, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, "model.norm.weight")
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


IDS = np.random.default_rng(1).integers(0, BASE["vocab_size"], (2, LENGTH)).astype(np.int32)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_forward_equals_numpy(kind, tmp_path):
    cfg = CONFIGS[kind]
    tensors = hf_tensors(cfg)
    model = zoo.load_llama(write_checkpoint(tmp_path, cfg, tensors))
    assert model.config.model_type == kind
    mask = np.ones_like(IDS)
    mask[1, 7:] = 0  # right padding in the second row
    for m in (None, mask):
        ours = np.asarray(model(jnp.asarray(IDS), None if m is None else jnp.asarray(m)))
        ref = numpy_llama(tensors, cfg, IDS, m)
        assert ours.shape == (2, LENGTH, cfg["vocab_size"])
        assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_sliding_window_matters():
    """The mistral reference differs from full causal attention, so the test above checks the window."""
    cfg = CONFIGS["mistral"]
    tensors = hf_tensors(cfg)
    full = numpy_llama(tensors, {**cfg, "model_type": "llama"}, IDS)
    assert np.abs(full - numpy_llama(tensors, cfg, IDS)).max() > 1e-2


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_load_round_trip_and_scanned_equals_unrolled(kind, tmp_path):
    cfg = CONFIGS[kind]
    tensors = hf_tensors(cfg)
    src = write_checkpoint(tmp_path / "src", cfg, tensors)
    unrolled = zoo.load_llama(src)
    scanned = zoo.load_llama(src, scan_layers=True)
    assert scanned.layers.mlp.up_proj.kernel.shape == (2, 32, 48)
    np.testing.assert_allclose(scanned(jnp.asarray(IDS)), unrolled(jnp.asarray(IDS)), atol=1e-5, rtol=1e-5)
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        zoo.save_llama(tmp_path / name, model)
        saved = load_file(str(tmp_path / name / "model.safetensors"))
        assert sorted(saved) == sorted(tensors)
        for k in tensors:
            np.testing.assert_array_equal(saved[k], tensors[k], err_msg=k)
        assert zoo.LlamaConfig.from_hf(json.loads((tmp_path / name / "config.json").read_text())) == model.config


def test_scanned_layers_apply_a_right_padded_mask_as_numpy_does(tmp_path):
    """The scan passes the attention mask to every layer: padded queries see only the real keys
    (the unrolled model with a mask is checked in test_forward_equals_numpy)."""
    cfg = CONFIGS["mistral"]
    tensors = hf_tensors(cfg)
    src = write_checkpoint(tmp_path, cfg, tensors)
    mask = np.ones_like(IDS)
    mask[1, 7:] = 0  # each padded query still sees a real key inside the window of 4
    ref = numpy_llama(tensors, cfg, IDS, mask)
    assert np.abs(ref - numpy_llama(tensors, cfg, IDS)).max() > 0.1  # the padding changes the padded rows
    ours = np.asarray(zoo.load_llama(src, scan_layers=True)(jnp.asarray(IDS), jnp.asarray(mask)))
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_sharded_index(tmp_path):
    cfg = CONFIGS["llama"]
    tensors = hf_tensors(cfg)
    write_sharded(tmp_path, cfg, tensors)
    model = zoo.load_llama(tmp_path, scan_layers=True)
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - numpy_llama(tensors, cfg, IDS)).max() <= 1e-4


def test_bad_checkpoints_name_the_tensor(tmp_path):
    cfg = CONFIGS["llama"]
    tensors = hf_tensors(cfg)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"layers/1/mlp/up_proj/kernel.*missing"):
        zoo.load_llama(write_checkpoint(tmp_path / "a", cfg, missing))
    wrong = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}
    with pytest.raises(ValueError, match=r"layers/0/self_attn/k_proj/kernel.*shape \(32, 8\)"):
        zoo.load_llama(write_checkpoint(tmp_path / "b", cfg, wrong))
    extra = {**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}
    with pytest.raises(ValueError, match="q_norm"):
        zoo.load_llama(write_checkpoint(tmp_path / "c", cfg, extra))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        zoo.load_llama(tmp_path / "d")


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma"}, "model_type='gemma'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling="),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
])
def test_from_hf_names_unsupported_fields(change, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace("[", r"\[")):
        zoo.LlamaConfig.from_hf({**CONFIGS["llama"], **change})
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        zoo.LlamaConfig.from_hf({**CONFIGS["qwen2"], "use_sliding_window": True})
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        zoo.LlamaConfig.from_hf({**CONFIGS["llama"], "num_key_value_heads": 3})


def write_sharded(directory, cfg, tensors, shards=2):
    """``tensors`` split over ``shards`` files with a ``model.safetensors.index.json``, as transformers writes."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
    for shard, members in files.items():
        save_file({k: tensors[k] for k in members}, str(directory / shard))
    weight_map = {k: shard for shard, members in files.items() for k in members}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _replace_file(directory, name, data):
    (directory / name).write_bytes(data)
    return directory


@pytest.mark.parametrize("damage, file", [
    (lambda b: b[: len(b) // 2], "model.safetensors"),          # truncated
    (lambda b: b"", "model.safetensors"),                         # empty
    (lambda b: bytes(range(256)) * 4, "model.safetensors"),      # random bytes
])
def test_unreadable_safetensors_is_one_value_error_naming_the_file(tmp_path, damage, file):
    cfg = CONFIGS["llama"]
    src = write_checkpoint(tmp_path, cfg, hf_tensors(cfg))
    _replace_file(src, file, damage((src / file).read_bytes()))
    with pytest.raises(ValueError, match=f"{file}: not a readable safetensors file") as e:
        zoo.load_llama(src)
    assert "\n" not in str(e.value)


def test_damaged_sharded_checkpoints_are_value_errors_naming_the_file(tmp_path):
    cfg = CONFIGS["llama"]
    tensors = hf_tensors(cfg)
    shard = "model-00002-of-00002.safetensors"
    src = write_sharded(tmp_path / "truncated", cfg, tensors)
    _replace_file(src, shard, (src / shard).read_bytes()[:-7])
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file"):
        zoo.load_llama(src)
    src = write_sharded(tmp_path / "wrong", cfg, tensors)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    moved = sorted(index["weight_map"])[0]       # listed in the wrong shard
    index["weight_map"][moved] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"index.json: places \[{moved!r}\] in {shard}, which does not hold them"):
        zoo.load_llama(src)
    src = write_sharded(tmp_path / "no_map", cfg, tensors)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="index.json: no 'weight_map'"):
        zoo.load_llama(src)
    (src / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json: not valid JSON"):
        zoo.load_llama(src)


def test_config_without_a_required_field_names_it(tmp_path):
    cfg = {k: v for k, v in CONFIGS["llama"].items() if k != "num_attention_heads"}
    src = write_checkpoint(tmp_path, cfg, hf_tensors(CONFIGS["llama"]))
    with pytest.raises(ValueError, match="config.json: required field 'num_attention_heads' is missing"):
        zoo.load_llama(src)
    (src / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        zoo.load_llama(src)


def test_integer_tensor_in_a_float_slot_is_refused(tmp_path):
    cfg = CONFIGS["llama"]
    tensors = hf_tensors(cfg)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = np.ones(tensors[name].shape, np.int32)
    with pytest.raises(ValueError, match=rf"{name}' \(for layers/0/mlp/up_proj/kernel\) has dtype int32"):
        zoo.load_llama(write_checkpoint(tmp_path, cfg, tensors))


def test_save_over_a_sharded_checkpoint_leaves_one_model(tmp_path):
    cfg = CONFIGS["llama"]
    old, new = hf_tensors(cfg, seed=0), hf_tensors(cfg, seed=1)
    write_sharded(tmp_path, cfg, old)
    (tmp_path / "tokenizer.json").write_text("{}")                  # not the checkpoint's: stays
    zoo.save_llama(tmp_path, zoo.load_llama(write_checkpoint(tmp_path / "new", cfg, new)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "new", "tokenizer.json"]
    assert np.abs(np.asarray(zoo.load_llama(tmp_path)(jnp.asarray(IDS))) - numpy_llama(new, cfg, IDS)).max() <= 1e-4


def test_single_file_wins_over_an_index_as_in_transformers(tmp_path):
    cfg = CONFIGS["llama"]
    old, new = hf_tensors(cfg, seed=0), hf_tensors(cfg, seed=1)
    write_sharded(tmp_path, cfg, old)
    save_file(new, str(tmp_path / "model.safetensors"))
    assert np.abs(np.asarray(zoo.load_llama(tmp_path)(jnp.asarray(IDS))) - numpy_llama(new, cfg, IDS)).max() <= 1e-4


def test_lazy_sharded_bf16_checkpoint_compresses_as_the_loaded_one(tmp_path):
    """Streaming (issue 29): every tensor left as a Lazy handle, read as stored (bfloat16, two shards) when the
    engine reaches them, give the compressed result of the model read whole, bit for bit."""
    from flax import nnx

    import jaxopt_big as jb

    cfg = CONFIGS["qwen2"]  # biases and tied embeddings too
    tensors = {k: v.astype(jnp.bfloat16) for k, v in hf_tensors(cfg).items()}
    write_sharded(tmp_path, cfg, tensors)
    lazy = zoo.load_llama(tmp_path, lazy=True)
    handle = lazy.layers[1].mlp.down_proj.kernel.get_value()
    assert jb.oneshot.is_lazy(handle) and handle.shape == (48, 32)  # not read yet
    # nor the embeddings and final norm (float32 embeddings and head were 500 MB at the 1B shape)
    assert all(jb.oneshot.is_lazy(x) for x in jax.tree.leaves(nnx.state(lazy, nnx.Param)))
    expected = tensors["model.layers.1.mlp.down_proj.weight"].astype(np.float32).T
    assert np.array_equal(np.asarray(handle.read()), expected)
    spec = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(16))
    recipe = jb.Recipe([jb.tree.Rule(r"layers/.*", jb.Plan(quant=jb.GPTQ(spec)))])
    batches = [np.random.default_rng(i).integers(0, cfg["vocab_size"], (2, 8), dtype=np.int32) for i in range(2)]
    ours, _ = jb.oneshot.compress(lazy, None, batches, recipe, progress=False)
    whole, _ = jb.oneshot.compress(zoo.load_llama(tmp_path), None, batches, recipe, progress=False)
    ours, whole = nnx.to_pure_dict(ours), nnx.to_pure_dict(whole)
    assert jb.tree.paths(ours) == jb.tree.paths(whole)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(whole)):
        assert not jb.oneshot.is_lazy(a) and np.array_equal(np.asarray(a), np.asarray(b))
