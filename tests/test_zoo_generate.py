"""jb.zoo.generate against the model's own full (cache-free) forward, and the int8 KV cache against numpy.

Greedy decoding with a cache must pick, at every step, the argmax of the full forward over the
prompt and the tokens generated so far; the references here run ``model(ids)`` (through
``jb.intercept.run_compressed`` for compressed weights) on each row's real tokens without padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxopt_big as jb
from jaxopt_big import cli
from jaxopt_big.quant import PER_CHANNEL, Group, QuantSpec
from jaxopt_big.zoo import CacheFormat

CONFIG = jb.zoo.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, max_positions=64)
LINEARS = r".*_proj/kernel|lm_head/kernel"
NEW = 6
BUCKET = 8


@pytest.fixture(scope="module")
def model():
    return jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0))


def weights(model, kind):
    state = nnx.state(model, nnx.Param)
    if kind == "float32":
        return state
    if kind == "bfloat16":
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    if kind == "int8":
        return jb.quant.quantize_params(state, QuantSpec(bits=8, granularity=PER_CHANNEL), where=LINEARS)
    if kind == "int4":
        return jb.quant.quantize_params(state, QuantSpec(bits=4, granularity=Group(16)), where=LINEARS)
    masks = jb.sparsity.make_masks(jb.sparsity.magnitude(state), 0.5, where=LINEARS)
    return jb.sparsity.pack_params(jb.sparsity.apply_masks(state, masks), masks)


def full_logits(model, params, rows):
    """The model's forward over each row of ``rows`` without a cache, compressed kernels run by their hooks;
    one jitted batch: the rows padded at the end (a causal model's logits before the padding do not change)."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r

    @jax.jit
    def forward(params, ids):
        m = nnx.merge(graphdef, params, rest)
        return (jb.intercept.run_compressed(m) if jb.leaves.has_compressed(params) else m)(ids)
    logits = np.asarray(forward(params, jnp.asarray(ids)).astype(jnp.float32))
    return [y[:len(r)] for y, r in zip(logits, rows)]


PROMPTS = [np.array([3, 9, 27, 17]), np.array([5, 11, 2, 40, 33, 8, 1])]


def padded(side):
    width = max(len(p) for p in PROMPTS) + 1  # one more: every row has padding
    ids, mask = np.zeros((len(PROMPTS), width), np.int32), np.zeros((len(PROMPTS), width), np.int32)
    for i, p in enumerate(PROMPTS):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    return ids, mask


@pytest.mark.parametrize("kind,side", [("float32", "left"), ("float32", "right"), ("bfloat16", "left"),
                                       ("int8", "right"), ("int4", "left"), ("sparse", "left")])
def test_greedy_tokens_are_the_argmax_of_the_full_forward_at_every_step(model, kind, side):
    params = weights(model, kind)
    ids, mask = padded(side)
    out = jb.zoo.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW, bucket=BUCKET)
    assert out.tokens.shape == (len(PROMPTS), NEW) and out.prompt_length == BUCKET
    rows = [np.concatenate([prompt, tokens[:-1]]) for prompt, tokens in zip(PROMPTS, out.tokens)]
    for prompt, tokens, logits in zip(PROMPTS, out.tokens, full_logits(model, params, rows)):
        np.testing.assert_array_equal(logits[len(prompt) - 1:].argmax(-1), tokens)


def test_scanned_model_generates_what_the_unrolled_one_does(model, tmp_path):
    jb.zoo.save_llama(tmp_path, model)
    scanned = jb.zoo.load_llama(tmp_path, scan_layers=True)
    a = jb.zoo.generate(model, None, PROMPTS[1], max_new_tokens=NEW, bucket=BUCKET, return_logits=True)
    b = jb.zoo.generate(scanned, None, PROMPTS[1], max_new_tokens=NEW, bucket=BUCKET, return_logits=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)


def test_prompts_in_one_bucket_share_one_compiled_program(model):
    compiles = []

    def listen(event, _secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jb.zoo.generate(model, None, PROMPTS[0][:3], max_new_tokens=NEW, bucket=16)  # a bucket no other test uses
        first = len(compiles)
        for n in (1, 9, 16):  # the same bucket of 16: other lengths and tokens
            out = jb.zoo.generate(model, None, np.arange(n) + 7, max_new_tokens=NEW, bucket=16)
            assert out.compile_seconds < 1.0
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first >= 2  # the listener sees compiles: the first call compiled the prefill and the decode loop
    assert len(compiles) == first, compiles[first:]


def test_top_k_one_is_greedy_and_samples_come_from_the_top_k(model):
    greedy = jb.zoo.generate(model, None, PROMPTS[0], max_new_tokens=NEW, bucket=BUCKET)
    one = jb.zoo.generate(model, None, PROMPTS[0], max_new_tokens=NEW, bucket=BUCKET, temperature=1.5, top_k=1,
                          key=jax.random.key(3))
    np.testing.assert_array_equal(one.tokens, greedy.tokens)
    ids = np.stack([PROMPTS[0]] * 8)  # 8 rows: 48 draws
    k3 = jb.zoo.generate(model, None, ids, max_new_tokens=NEW, bucket=BUCKET, temperature=5.0, top_k=3,
                         key=jax.random.key(1), return_logits=True)
    logits = np.asarray(k3.logits)
    rank = (logits > np.take_along_axis(logits, k3.tokens[..., None], -1)).sum(-1)
    assert rank.max() < 3 and rank.max() > 0  # inside the top 3, and not always the argmax (T=5 is flat)


def test_top_p_samples_come_from_the_nucleus(model):
    ids = np.stack([PROMPTS[1]] * 8)
    out = jb.zoo.generate(model, None, ids, max_new_tokens=NEW, bucket=BUCKET, temperature=2.0, top_p=0.3,
                          key=jax.random.key(2), return_logits=True)
    p = np.asarray(jax.nn.softmax(out.logits / 2.0, -1), np.float64)
    chosen = np.take_along_axis(p, out.tokens[..., None], -1)
    more_likely = np.where(p > chosen, p, 0).sum(-1)   # mass of strictly more likely tokens
    assert (more_likely < 0.3 + 1e-6).all()


def test_int8_cache_stores_each_vector_within_half_a_step():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 16)) * jnp.arange(1, 6)[:, None]
    cache = jb.zoo.KVCache.empty(layers=1, batch=2, kv_heads=3, length=5, head_dim=16, dtype=jnp.float32,
                                 fmt=CacheFormat.INT8).write(0, x, -x)
    k, v, ks, vs = (np.asarray(a[0]) for a in (cache.keys, cache.values, cache.key_scale, cache.value_scale))
    xn = np.asarray(x)
    np.testing.assert_allclose(ks, np.abs(xn).max(-1) / 127, rtol=1e-6)
    assert (np.abs(k * ks[..., None] - xn) <= ks[..., None] / 2 + 1e-6).all()
    assert (np.abs(v * vs[..., None] + xn) <= vs[..., None] / 2 + 1e-6).all()


def test_int8_cache_logits_stay_close_to_the_model_dtype_cache(model):
    a = jb.zoo.generate(model, None, PROMPTS[1], max_new_tokens=NEW, bucket=BUCKET, return_logits=True)
    b = jb.zoo.generate(model, None, PROMPTS[1], max_new_tokens=NEW, bucket=BUCKET, return_logits=True,
                        kv_cache=CacheFormat.INT8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    err = np.abs(np.asarray(a.logits) - np.asarray(b.logits)).max()
    assert 0 < err < 0.02 * np.abs(np.asarray(a.logits)).max()


def test_eos_stops_a_row_and_repeats_eos(model):
    out = jb.zoo.generate(model, None, PROMPTS[1], max_new_tokens=NEW, bucket=BUCKET)
    eos = int(out.tokens[0, 1])
    stopped = jb.zoo.generate(model, None, PROMPTS[1], max_new_tokens=NEW, bucket=BUCKET, eos_id=eos)
    np.testing.assert_array_equal(stopped.tokens[0], [out.tokens[0, 0], eos] + [eos] * (NEW - 2))


@pytest.mark.parametrize("kwargs,error,words", [
    ({"kv_cache": "int8"}, TypeError, "CacheFormat"),
    ({"top_k": 3}, ValueError, "temperature > 0"),
    ({"temperature": 1.0}, ValueError, "explicit key"),
    ({"top_p": 0.0, "temperature": 1.0, "key": jax.random.key(0)}, ValueError, "top_p"),
    ({"max_new_tokens": 61}, ValueError, "max_positions=64"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"attention_mask": [[0, 0, 0, 0]]}, ValueError, "no real token"),
    ({"prompt_ids": [[1, 2, 64, 3]]}, ValueError, "token id 64"),
])
def test_bad_input_names_the_argument(model, kwargs, error, words):
    args = {"prompt_ids": [[1, 2, 3, 4]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=words):
        jb.zoo.generate(model, None, args.pop("prompt_ids"), **args)


BYTES = jb.zoo.LlamaConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=64, max_positions=128)


def _cli(capsys, *argv):
    code = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generates_from_a_compressed_folder_what_generate_does(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = jb.zoo.Llama(BYTES, rngs=nnx.Rngs(1))
    jb.zoo.save_llama(tmp_path / "src", model)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one id per UTF-8 byte
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.save(str(tmp_path / "src" / "tokenizer.json"))
    dst = tmp_path / "int8"
    assert cli.main(["compress", str(tmp_path / "src"), "--out", str(dst), "--recipe", "int8",
                        "--samples", "2", "--length", "16"]) == 0
    capsys.readouterr()
    code, out, err = _cli(capsys, str(dst), "--prompt", "def f(x):", "--max-new-tokens", "5")
    assert code == 0, err
    skeleton, params = jb.hf.load_compressed(dst)
    assert jb.leaves.has_compressed(params)
    want = jb.zoo.generate(skeleton, params, tokenizer.encode("def f(x):").ids, max_new_tokens=5).tokens[0]
    assert out == "def f(x):" + tokenizer.decode([int(t) for t in want]) + "\n"
    assert "tokens/s" in err


def test_cli_reads_an_hf_folder_with_its_tokenizer_and_refuses_bad_folders(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(CONFIG.vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0))
    jb.zoo.save_llama(tmp_path, model)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    code, out, err = _cli(capsys, str(tmp_path), "--prompt", "w3 w9 w27", "--max-new-tokens", "4")
    assert code == 0, err
    want = jb.zoo.generate(model, None, [3, 9, 27], max_new_tokens=4).tokens[0]
    assert out == "w3 w9 w27" + tokenizer.decode([int(t) for t in want]) + "\n"
    code, out, err = _cli(capsys, str(tmp_path / "nope"), "--prompt", "w1")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "tokenizer.json").unlink()
    code, out, err = _cli(capsys, str(tmp_path), "--prompt", "w1")
    assert code == 2 and "no tokenizer.json" in err and err.count("\n") == 1


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity=PER_CHANNEL), QuantSpec(bits=8),
                                  QuantSpec(bits=4, granularity=Group(128)), QuantSpec(bits=4, granularity=Group(32)),
                                  QuantSpec(bits=4, granularity=Group(256), symmetric=False),
                                  QuantSpec(bits=3, granularity=PER_CHANNEL)], ids=str)
def test_decode_step_kernels_give_the_dense_matmul_without_a_float_copy_of_the_kernel(spec):
    k, n = 1024, 384
    w = jax.random.normal(jax.random.key(0), (k, n))
    q = jb.quant.quantize(w, spec)
    dense = np.asarray(q.dense(), np.float64)
    layer = nnx.Linear(k, n, use_bias=False, rngs=nnx.Rngs(0))
    arranged = jb.quant.decode_layout(q)  # what generate runs: int8/int4 without groups in the decode layout
    arrangeable = spec.bits != 3 and not isinstance(spec.granularity, Group)
    assert isinstance(arranged, jb.quant.DecodeArray) == arrangeable and arranged.nbytes == q.nbytes
    for kernel in {id(q): q, id(arranged): arranged}.values():
        layer.kernel.set_value(kernel)
        run = jax.jit(lambda x: jb.intercept.run_compressed(layer)(x))
        for shape in [(1, k), (2, 3, k)]:  # one decode row; a batch of a few
            x = jax.random.normal(jax.random.key(1), shape)
            y = np.asarray(run(x))
            np.testing.assert_allclose(y, np.asarray(x, np.float64) @ dense, rtol=1e-4, atol=1e-4)
        memory = run.lower(jnp.zeros((1, k))).compile().memory_analysis()
        # a float32 kernel would be 4 * k * n bytes; int8/int4 codes are not even copied whole (int3 unpacks
        # tiles of 256 x n int8, two thirds of its packed bytes)
        assert memory.temp_size_in_bytes < (kernel.nbytes if spec.bits in (4, 8) else k * n)
