"""llama.cpp itself runs the GGUF files that ``jaxopt-big compress --export gguf`` writes.

A tiny Hugging Face-layout Llama with a byte-level BPE ``tokenizer.json`` is trained a little on the
docs corpus, compressed by the command line with presets ``gptq-q4_0`` and ``q8_0`` (and exported as
float F32 and F16 through ``jb.export.gguf``; its weights with q/k/v biases also as a Qwen2, F32 and
Q8_0), and each ``.gguf`` is loaded by ``llama-cpp-python``
(llama.cpp built from source: ``pip install jaxopt-big[bench]``, KV cache in float32). For each file:

- the tokenizer: llama.cpp tokenizes and detokenizes a text as the ``tokenizers`` package does;
- the logits at every position of a prompt, ``max |llama.cpp - ours| / max |ours|``, against our model
  on the densified weights, and against a numpy forward of those weights that rounds each matmul's
  input as ggml's CPU matmul does: ggml converts the activations to the weight type's dot type first
  (none for F32, float16 for F16, Q8_0 blocks of 32 for Q4_0 and Q8_0 weights). That rounding, not
  the file, is what separates llama.cpp from the dequantized model for quantized weights;
- greedy text: llama.cpp's own sampler at temperature 0 against ``jb.zoo.generate`` on the same
  compressed parameters.

Run: ``python benchmarks/llama_cpp_check.py [--quick]``. Exits 1 when the file is wrong: llama.cpp's
tokenizer, logits (beyond 1e-3) or greedy tokens differ from our weights under llama.cpp's rounding. The
result's ``holds`` also asks greedy tokens equal to ``jb.zoo.generate``'s, which the activation rounding
can break at a near-tie of the quantized models (the details say where).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile

import gguf
import jax
import jax.numpy as jnp
import llama_cpp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = pathlib.Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import jaxopt_big as jb  # noqa: E402
from common import write  # noqa: E402

CONFIG = jb.zoo.LlamaConfig(vocab_size=320, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=256, max_positions=128, rope_theta=1e4, rms_eps=1e-5)
PROMPT = "def read(path):\n    with open(path) as f:\n        return f.read()\n"
GOAL = 1e-3
GGML_TYPE_F32 = 0   # llama.cpp's KV cache in float32, so the cache does not round what is compared


def _train(tok: Tokenizer, steps: int) -> jb.zoo.Llama:
    """The tiny Llama trained a little on the docs corpus: confident next-token choices, so greedy text
    is decided by the weights, not by near-ties that any rounding flips."""
    text = jb.data.decode(jb.data.docs_corpus().train)
    data = jb.data.lm_dataset(np.asarray(tok.encode(text).ids, np.int32), 64)
    graphdef, params = nnx.split(jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0)))

    def loss(p, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean(), {}

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps, 1e-4))
    step = jb.train.make_step(loss, tx)
    data = data.take(slice(0, min(len(data), steps * 8)))
    state, _ = jb.train.fit(step, jb.train.TrainState.create(params, tx), data, epochs=max(1, steps * 8 // len(data)),
                            batch_size=8, key=jax.random.key(0), desc="tiny llama")
    return nnx.merge(graphdef, state.params)


def _source(directory: pathlib.Path, steps: int) -> Tokenizer:
    """A tiny Llama in HF layout with a byte-level BPE tokenizer.json trained on the docs corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([jb.data.decode(jb.data.docs_corpus().train[:20000])], trainer)
    jb.zoo.save_llama(directory, _train(tok, steps))
    tok.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "bos_token_id": 0, "eos_token_id": 1}))
    return tok


def _compressed(src: pathlib.Path, out: pathlib.Path, recipe: str) -> tuple[pathlib.Path, object, object]:
    """``jaxopt-big compress --recipe RECIPE --export gguf``: (the .gguf, the model, its compressed params)."""
    from jaxopt_big import cli

    argv = ["compress", str(src), "--out", str(out), "--recipe", recipe, "--export", "gguf",
            "--samples", "8", "--length", "32"]
    if cli.main(argv) != 0:
        raise SystemExit(f"jaxopt-big {' '.join(argv)} failed")
    model, params = jb.hf.load_compressed(out)
    return out / "model.gguf", model, params


def _float(src: pathlib.Path, out: pathlib.Path, dtype: str) -> tuple[pathlib.Path, object, object]:
    """``jb.export.gguf`` of the float model, its kernels cast to ``dtype`` (F32 or F16 in the file)."""
    model = jb.zoo.load_llama(src)
    params = nnx.state(model, nnx.Param)
    if dtype != "float32":
        params = jax.tree.map(lambda x: x.astype(dtype) if x.ndim == 2 else x, params)
    out.mkdir()
    jb.export.gguf(out / "model.gguf", model, params, tokenizer=src)
    return out / "model.gguf", model, params


def _qwen2(src: pathlib.Path, out: pathlib.Path, preset: str | None) -> tuple[pathlib.Path, object, object]:
    """The trained weights as a Qwen2 (random q/k/v biases added), through ``jb.export.gguf``: float, or
    quantized with a preset first."""
    model = jb.zoo.Llama(dataclasses.replace(CONFIG, attention_bias=True), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(jb.zoo.load_llama(src), nnx.Param))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            linear.bias.set_value(jnp.asarray(rng.normal(0, 0.3, linear.bias.shape), jnp.float32))
    params = nnx.state(model, nnx.Param)
    if preset is not None:
        params = jb.recipe.preset(preset).apply(params)
    out.mkdir()
    jb.export.gguf(out / "model.gguf", model, params, tokenizer=src)
    return out / "model.gguf", model, params


def _ours(model, params, ids: list[int], new: int) -> tuple[dict, np.ndarray, list[int]]:
    """(densified float32 weights, logits of the densified model at every prompt position, greedy tokens of
    jb.zoo.generate on the compressed parameters)."""
    dense = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jb.leaves.densify(nnx.to_pure_dict(params)))
    reference = jb.zoo.Llama(model.config, rngs=nnx.Rngs(0))
    nnx.update(reference, dense)
    logits = np.asarray(reference(jnp.asarray([ids]))[0], np.float32)
    tokens = jb.zoo.generate(model, params, ids, max_new_tokens=new).tokens[0]
    return dense, logits, [int(t) for t in tokens]


def _q8_0(x: np.ndarray) -> np.ndarray:
    """``x`` as ggml's ``quantize_row_q8_0`` leaves it: blocks of 32, ``d = max|x| / 127`` in float16, codes rounded."""
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    q = np.rint(b * np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0))  # x * (1 / d), as ggml does
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


# the activation rounding ggml's CPU matmul applies for each weight type (its ``vec_dot_type``)
ROUNDING = {"F32": lambda x: x, "F16": lambda x: x.astype(np.float16).astype(np.float32), "Q8_0": _q8_0,
            "Q4_0": _q8_0}


def _emulated(c: jb.zoo.LlamaConfig, dense: dict, types: dict[str, str], ids: list[int]) -> np.ndarray:
    """Logits of the model in numpy, each matmul's input rounded as llama.cpp rounds it for that weight's type."""
    d, n, groups = c.hidden_size // c.num_heads, len(ids), c.num_heads // c.num_kv_heads

    def linear(x, module, name):
        y = ROUNDING[types[name]](x) @ np.asarray(module["kernel"], np.float32)
        return y + np.asarray(module["bias"], np.float32) if "bias" in module else y

    def norm(x, scale):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_eps) * np.asarray(scale, np.float32)

    angles = np.arange(n)[:, None] / c.rope_theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, None], np.sin(np.concatenate([angles] * 2, -1))[:, None]

    def rope(x):  # (n, heads, d), Hugging Face's rotate-half
        return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    h = np.asarray(dense["embed_tokens"]["embedding"], np.float32)[ids]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i, layer in enumerate(dense["layers"].values() if isinstance(dense["layers"], dict) else dense["layers"]):
        a, x = layer["self_attn"], norm(h, layer["input_layernorm"]["scale"])
        q = rope(linear(x, a["q_proj"], f"blk.{i}.attn_q.weight").reshape(n, c.num_heads, d))
        k = rope(linear(x, a["k_proj"], f"blk.{i}.attn_k.weight").reshape(n, c.num_kv_heads, d))
        v = linear(x, a["v_proj"], f"blk.{i}.attn_v.weight").reshape(n, c.num_kv_heads, d)
        k, v = np.repeat(k, groups, 1), np.repeat(v, groups, 1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
        p = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, -1)
        h = h + linear(ctx, a["o_proj"], f"blk.{i}.attn_output.weight")
        m, x = layer["mlp"], norm(h, layer["post_attention_layernorm"]["scale"])
        gate = linear(x, m["gate_proj"], f"blk.{i}.ffn_gate.weight")
        x = gate / (1 + np.exp(-gate)) * linear(x, m["up_proj"], f"blk.{i}.ffn_up.weight")
        h = h + linear(x, m["down_proj"], f"blk.{i}.ffn_down.weight")
    return linear(norm(h, dense["norm"]["scale"]), dense["lm_head"], "output.weight")


def _llama_cpp(path: pathlib.Path, ids: list[int], new: int) -> tuple[llama_cpp.Llama, np.ndarray, list[int]]:
    """(the loaded model, logits at every prompt position, llama.cpp's greedy tokens at temperature 0)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CONFIG.max_positions, n_batch=CONFIG.max_positions,
                          logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=2, seed=0,
                          verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)], np.float32)
    tokens = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(t))
        if len(tokens) == new:
            break
    return llm, logits, tokens


def check(name: str, path: pathlib.Path, model, params, tok: Tokenizer, new: int) -> dict:
    ids = tok.encode(PROMPT).ids
    llm, theirs, their_tokens = _llama_cpp(path, ids, new)
    dense, ours, our_tokens = _ours(model, params, ids, new)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    emulated = _emulated(model.config, dense, types, ids)
    emulated_tokens = list(ids)
    for _ in range(new):  # greedy, the whole sequence recomputed each step
        emulated_tokens.append(int(_emulated(model.config, dense, types, emulated_tokens)[-1].argmax()))
    emulated_tokens = emulated_tokens[len(ids):]
    error = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    top2 = np.sort(ours, axis=-1)[:, -2:]
    r = {"case": name, "relative_error": error, "within_1e-3": error <= GOAL,
         "relative_error_to_emulated_rounding": float(np.abs(theirs - emulated).max() / np.abs(emulated).max()),
         "argmax_equal": bool((theirs.argmax(-1) == ours.argmax(-1)).all()),
         "smallest_top2_gap": float((top2[:, 1] - top2[:, 0]).min()),
         "greedy_equal": their_tokens == our_tokens,
         "greedy_tokens_before_first_difference": next(
             (i for i, (a, b) in enumerate(zip(their_tokens, our_tokens)) if a != b), new),
         "greedy_equal_to_emulated_rounding": their_tokens == emulated_tokens,
         "greedy_text_equal": llm.detokenize(their_tokens).decode("utf-8", "replace") == tok.decode(our_tokens),
         "tokenizer_equal": llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
         and llm.detokenize(ids).decode() == tok.decode(ids)}
    print(json.dumps(r), flush=True)
    return r


def main(quick: bool) -> int:
    new, steps = (16, 100) if quick else (48, 400)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        tok = _source(root / "src", steps)
        cases = {"F32": lambda: _float(root / "src", root / "f32", "float32"),
                 "F16": lambda: _float(root / "src", root / "f16", "float16"),
                 "Q8_0 (preset q8_0)": lambda: _compressed(root / "src", root / "q8", "q8_0"),
                 "Q4_0 (preset gptq-q4_0)": lambda: _compressed(root / "src", root / "q4", "gptq-q4_0"),
                 "Qwen2 F32": lambda: _qwen2(root / "src", root / "qwen2-f32", None),
                 "Qwen2 Q8_0 (preset q8_0)": lambda: _qwen2(root / "src", root / "qwen2-q8", "q8_0")}
        for name, make in cases.items():
            rows.append(check(name, *make(), tok, new))
    worst = max(r["relative_error_to_emulated_rounding"] for r in rows)
    floats = all(r["within_1e-3"] for r in rows if r["case"].endswith(("F32", "F16")))
    holds = worst <= GOAL and floats and all(
        r["greedy_equal"] and r["greedy_text_equal"] and r["tokenizer_equal"] for r in rows)
    exact = all(r["greedy_equal_to_emulated_rounding"] and r["tokenizer_equal"] for r in rows) and worst <= GOAL
    details = {f"{r['case']}: {k}": v for r in rows for k, v in r.items() if k != "case"}
    details.update({"llama-cpp-python": llama_cpp.__version__, "new tokens": new, "training steps": steps,
                    "config": CONFIG.to_hf()})
    write("llama_cpp_check", ours=worst, baseline=GOAL, unit="", details=details, holds=holds,
          goal="llama.cpp logits within 1e-3 relative of our model with llama.cpp's activation rounding (none for F32, "
               "float16 for F16, Q8_0 blocks for Q8_0/Q4_0 weights), float files also of our plain dequantized model; "
               "tokenizer, greedy tokens and text equal to jb.zoo.generate")
    return 0 if exact else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer generated tokens")
    sys.exit(main(parser.parse_args().quick))
