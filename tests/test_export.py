"""jb.export: GGUF read back by llama.cpp's own gguf package, compressed-tensors read back by a parser
written here from the format's documentation; both must give our densified weights exactly."""

import json

import gguf
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxopt_big as jb
from jaxopt_big import cli

CONFIG = jb.zoo.LlamaConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=96, max_positions=64, rope_theta=5e5, rms_eps=1e-5)
LINEARS = {"attn_q": "self_attn/q_proj", "attn_k": "self_attn/k_proj", "attn_v": "self_attn/v_proj",
           "attn_output": "self_attn/o_proj", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
           "ffn_down": "mlp/down_proj"}


def _bpe(directory):
    """A byte-level BPE tokenizer.json trained on the embedded docs, with bos/eos in config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([jb.data.decode(jb.data.docs_corpus().train[:20000])], trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "bos_token_id": 0, "eos_token_id": 1}))
    return tok


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    jb.zoo.save_llama(directory, jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0)))
    _bpe(directory)
    return directory


@pytest.fixture(scope="module")
def q4(src, tmp_path_factory):
    """`jaxopt-big compress --recipe gptq-q4_0 --export gguf`: the GGUF and our compressed parameters."""
    dst = tmp_path_factory.mktemp("out") / "q4"
    argv = ["compress", str(src), "--out", str(dst), "--recipe", "gptq-q4_0", "--export", "gguf",
            "--samples", "8", "--length", "32"]
    assert cli.main(argv) == 0
    return dst / "model.gguf", jb.hf.load_compressed(dst)[1]


def _unpermute(w, heads):
    """llama.cpp's interleaved q/k rows back to Hugging Face's rotate-half order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key):
    return reader.fields[key].contents()


def _expected(params):
    """GGUF tensor name -> our densified value in the torch layout, q/k rows as Hugging Face has them."""
    dense = jb.leaves.densify(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
    out = {"token_embd.weight": dense["embed_tokens"]["embedding"], "output_norm.weight": dense["norm"]["scale"],
           "output.weight": dense["lm_head"]["kernel"].T}
    for i in range(CONFIG.num_layers):
        layer = dense["layers"][i]
        out[f"blk.{i}.attn_norm.weight"] = layer["input_layernorm"]["scale"]
        out[f"blk.{i}.ffn_norm.weight"] = layer["post_attention_layernorm"]["scale"]
        for short, module in LINEARS.items():
            a, b = module.split("/")
            out[f"blk.{i}.{short}.weight"] = layer[a][b]["kernel"].T
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _read_back(path):
    """GGUF tensor name -> (type name, value dequantized by gguf.quants, q/k rows back in HF order)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        value = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if ".attn_q." in t.name or ".attn_k." in t.name:
            value = _unpermute(value, CONFIG.num_heads if ".attn_q." in t.name else CONFIG.num_kv_heads)
        out[t.name] = (t.tensor_type.name, value)
    return out


def _check_exact(path, params, kernel_type):
    got, want = _read_back(path), _expected(params)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        kind, back = got[name]
        assert kind == (kernel_type if name.startswith("blk.") and "norm" not in name else "F32"), name
        np.testing.assert_array_equal(back, value, err_msg=name)


def test_gguf_q4_0_from_gptq_reads_back_exactly_with_its_metadata(q4, src):
    path, params = q4
    _check_exact(path, params, "Q4_0")
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    expected = {"llama.block_count": 2, "llama.context_length": 64, "llama.embedding_length": 64,
                "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 16, "llama.vocab_size": 320, "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 1, "general.file_type": 2}
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == 5e5
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    spec = json.loads((src / "tokenizer.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == 320 and all(tokens[i] == t for t, i in spec["model"]["vocab"].items())
    assert tokens[305] == "[PAD305]"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[0] == types[1] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                       for m in spec["model"]["merges"]]


def test_gguf_q8_0_from_round_to_nearest_reads_back_exactly(tmp_path):
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(1))
    params = jb.recipe.preset("q8_0").apply(nnx.state(model, nnx.Param))
    kernel = params["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert kernel.bits == 8 and kernel.scale.shape == (2, 96)   # groups of 32 inputs, not per channel
    types = jb.export.gguf(tmp_path / "m.gguf", model, params)
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["token_embd.weight"] == "F32"
    _check_exact(tmp_path / "m.gguf", params, "Q8_0")


def test_scale_dtype_rounds_scales_to_float16_without_clipping():
    w = jax.random.normal(jax.random.key(0), (64, 8)) * 3.0
    for bits in (4, 8):
        spec = jb.quant.QuantSpec(bits=bits, granularity=jb.quant.Group(32), scale_dtype="float16")
        q = jb.quant.quantize(w, spec)
        scale = np.asarray(q.scale)
        np.testing.assert_array_equal(scale.astype(np.float16).astype(np.float32), scale)
        plain = jb.quant.quantize(w, jb.quant.QuantSpec(bits=bits, granularity=jb.quant.Group(32)))
        assert np.abs(scale / np.asarray(plain.scale) - 1).max() <= 2.0 ** -11   # nearest float16
        assert float(np.abs(np.asarray(q.dense()) - np.asarray(w)).max()) <= scale.max() / 2 * (1 + 2 ** -10)
    with pytest.raises(ValueError, match="scale_dtype must be None, float16 or bfloat16, got 'float32'"):
        jb.quant.QuantSpec(scale_dtype="float32")


@pytest.mark.parametrize("spec, message", [
    (jb.quant.QuantSpec(bits=4, symmetric=False, granularity=jb.quant.Group(32), scale_dtype="float16"),
     "an affine grid"),
    (jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(16), scale_dtype="float16"), "scales per 16 of 96 inputs"),
    (jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(32)), "scales are not float16 numbers"),
])
def test_gguf_refuses_what_it_cannot_hold_exactly_and_leaves_nothing(tmp_path, spec, message):
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(1))
    params = jb.Recipe([jb.Rule(r".*/mlp/.*", jb.Plan(quant=spec))]).apply(nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match=rf"^layers/0/mlp/down_proj/kernel: {message}.*preset gptq-q4_0 or q8_0"):
        jb.export.gguf(tmp_path / "m.gguf", model, params)
    assert list(tmp_path.iterdir()) == []


def test_a_shorter_last_group_is_refused_by_both_formats(tmp_path):
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(1))
    d_in = nnx.state(model, nnx.Param)["layers"][0]["mlp"]["down_proj"]["kernel"].shape[0]
    size = 64 if d_in % 64 else 128 if d_in % 128 else None
    assert size is not None and d_in > size, d_in                       # a group that leaves a shorter last one
    spec = jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(size), scale_dtype="float16")
    params = jb.Recipe([jb.Rule(r".*/mlp/down_proj/.*", jb.Plan(quant=spec))]).apply(nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match=r"^layers/0/mlp/down_proj/kernel: its last group of inputs is shorter"):
        jb.export.gguf(tmp_path / "m.gguf", model, params)
    with pytest.raises(ValueError, match=r"^layers/0/mlp/down_proj/kernel: its last group of inputs is shorter"):
        jb.export.compressed_tensors(tmp_path / "ct", model, params)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_bad_spec_or_format_exits_2_in_one_line_and_writes_nothing(src, tmp_path, capsys):
    dst = tmp_path / "out"
    argv = ["compress", str(src), "--out", str(dst), "--recipe", "rtn-int4", "--samples", "8", "--length", "32"]
    assert cli.main([*argv, "--export", "gguf"]) == 2
    err = capsys.readouterr().err.split("\r")[-1]
    assert err.count("\n") == 1 and err.startswith("jaxopt-big: error: layers/0/"), err
    assert "gptq-q4_0" in err and list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--export", "onnx"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "'onnx'" in err and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------
# compressed-tensors, read by a parser written from the format's documentation

def _unpack(packed, bits, n):
    """Little-endian bit stream per row of int32 words -> the first n unsigned codes, minus 2^(bits-1)."""
    stream = np.unpackbits(np.ascontiguousarray(packed, "<i4").view(np.uint8), axis=-1, bitorder="little")
    codes = (stream[:, :n * bits].reshape(packed.shape[0], n, bits) << np.arange(bits)).sum(-1)
    return codes.astype(np.int32) - 2 ** (bits - 1)


def _ct_weights(directory):
    """{module: dense weight (out, in)} of every quantized module, as the documentation defines it."""
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(directory / "model.safetensors"))
    out = {}
    for group in config["config_groups"].values():
        w = group["weights"]
        for module in group["targets"]:
            scale = tensors[f"{module}.weight_scale"]
            if group["format"] == "int-quantized":
                codes = tensors[f"{module}.weight"].astype(np.int32)
            else:
                rows, cols = tensors[f"{module}.weight_shape"]
                codes = _unpack(tensors[f"{module}.weight_packed"], w["num_bits"], cols)
            zp = np.zeros_like(scale) if w["symmetric"] else \
                _unpack(tensors[f"{module}.weight_zero_point"].T, w["num_bits"], scale.shape[0]).T
            size = w["group_size"] or codes.shape[1]
            out[module] = (codes - np.repeat(zp, size, axis=1)) * np.repeat(scale, size, axis=1)
    return config, out, tensors


def _ours(params):
    dense = jb.leaves.densify(nnx.to_pure_dict(params))
    return {f"model.layers.{i}.{m.replace('/', '.')}": np.asarray(dense["layers"][i][m.split("/")[0]][
        m.split("/")[1]]["kernel"]).T for i in range(CONFIG.num_layers) for m in LINEARS.values()}


@pytest.mark.parametrize("spec, activations, fmt", [
    (jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(32), calibration=jb.quant.MSE()), None,
     "pack-quantized"),
    (jb.quant.QuantSpec(bits=4, symmetric=False, granularity=jb.quant.Group(32)), None, "pack-quantized"),
    (jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL), None, "pack-quantized"),
    (jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL),
     jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_TOKEN), "int-quantized"),
])
def test_compressed_tensors_decode_to_our_weights_exactly(tmp_path, spec, activations, fmt):
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(2))
    params = jb.Recipe([jb.Rule(r"lm_head/.*", None, required=False), jb.Rule(".*", jb.Plan(quant=spec))]).apply(
        nnx.state(model, nnx.Param))
    config = jb.export.compressed_tensors(tmp_path / "ct", model, params, activations=activations)
    written, weights, tensors = _ct_weights(tmp_path / "ct")
    assert written == config and json.loads((tmp_path / "ct" / "config.json").read_text())["model_type"] == "llama"
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    assert config["ignore"] == ["lm_head"] and len(config["config_groups"]) == 1
    group = config["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == spec.bits and group["weights"]["symmetric"] == spec.symmetric
    assert group["weights"]["strategy"] == ("group" if isinstance(spec.granularity, jb.quant.Group) else "channel")
    assert group["input_activations"] == (None if activations is None else
                                          {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                           "strategy": "token", "dynamic": True})
    ours = _ours(params)
    assert sorted(weights) == sorted(ours)
    for module, value in ours.items():
        np.testing.assert_array_equal(weights[module].astype(np.float32), value, err_msg=module)
    np.testing.assert_array_equal(tensors["lm_head.weight"], np.asarray(params["lm_head"]["kernel"].get_value()).T)


def test_compressed_tensors_w8a8_refuses_grouped_int4_and_leaves_nothing(tmp_path):
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(2))
    params = jb.recipe.preset("rtn-int4").apply(nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match=r"^layers/0/mlp/down_proj/kernel: int4 kernel .*preset int8"):
        jb.export.compressed_tensors(tmp_path / "ct", model, params,
                                     activations=jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_TOKEN))
    with pytest.raises(ValueError, match="activations must be None or QuantSpec"):
        jb.export.compressed_tensors(tmp_path / "ct", model, params, activations=jb.quant.QuantSpec(bits=8))
    assert list(tmp_path.iterdir()) == []


def _llama_cpp_logits(path, ids):
    """Logits of the GGUF as llama.cpp's LLM_ARCH_LLAMA graph computes them, in numpy: tensors as stored
    (q/k rows in its pair order) and RoPE rotating adjacent pairs (``LLAMA_ROPE_TYPE_NORM``)."""
    reader = gguf.GGUFReader(path)
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
         for t in reader.tensors}
    heads, kv, eps = (_field(reader, f"llama.{k}") for k in ("attention.head_count", "attention.head_count_kv",
                                                              "attention.layer_norm_rms_epsilon"))
    n, d = len(ids), w["blk.0.attn_q.weight"].shape[0] // heads
    angle = np.arange(n)[:, None, None] * _field(reader, "llama.rope.freq_base") ** (-np.arange(0, d, 2) / d)

    def rope(x):  # (n, heads, d): pairs (2i, 2i + 1) rotate by angle i
        a, b, cos, sin = x[..., 0::2], x[..., 1::2], np.cos(angle), np.sin(angle)
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)

    def norm(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w[name]

    h = w["token_embd.weight"][ids]
    for i in range(_field(reader, "llama.block_count")):
        x = norm(h, f"blk.{i}.attn_norm.weight")
        q, k, v = (x @ w[f"blk.{i}.attn_{p}.weight"].T for p in "qkv")
        q, k = rope(q.reshape(n, heads, d)), np.repeat(rope(k.reshape(n, kv, d)), heads // kv, 1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + np.triu(np.full((n, n), -np.inf), 1)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), np.repeat(v.reshape(n, kv, d), heads // kv, 1))
        h = h + ctx.reshape(n, -1) @ w[f"blk.{i}.attn_output.weight"].T
        x = norm(h, f"blk.{i}.ffn_norm.weight")
        gate, up = x @ w[f"blk.{i}.ffn_gate.weight"].T, x @ w[f"blk.{i}.ffn_up.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    return norm(h, "output_norm.weight") @ w["output.weight"].T


def test_gguf_run_as_llama_cpp_runs_it_gives_our_logits(q4):
    """The file's meaning, not only its bytes: a q/k row order that does not match llama.cpp's rotary pairs
    reads back equal tensors but different logits (benchmarks/llama_cpp_check.py runs llama.cpp itself)."""
    path, params = q4
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0))
    nnx.update(model, jb.leaves.densify(params))
    ids = [0, 5, 77, 200, 13, 299, 42, 8, 150, 3]
    ours = np.asarray(model(np.asarray([ids]))[0])
    theirs = _llama_cpp_logits(path, ids)
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()


def test_a_model_with_an_online_hadamard_is_refused_and_an_offline_rotation_exports(tmp_path):
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0))
    online = jb.zoo.rotate(model, key=jax.random.key(0))
    params = jb.recipe.preset("q8_0").apply(nnx.state(online, nnx.Param))
    with pytest.raises(ValueError, match="online Hadamard before down_proj .* online_hadamard=False"):
        jb.export.gguf(tmp_path / "m.gguf", online, params)
    with pytest.raises(ValueError, match="online Hadamard before down_proj"):
        jb.export.compressed_tensors(tmp_path / "ct", online, params)
    assert not list(tmp_path.iterdir())
    offline = jb.zoo.rotate(model, key=jax.random.key(0), online_hadamard=False)
    params = jb.recipe.preset("q8_0").apply(nnx.state(offline, nnx.Param))
    jb.export.compressed_tensors(tmp_path / "ct", offline, params)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert "jaxopt_big_online_hadamard" not in config and config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(load_file(str(tmp_path / "ct" / "model.safetensors"))["lm_head.weight"],
                                  np.asarray(offline.lm_head.kernel.get_value()).T)
