"""GGUF (llama.cpp's file format), written with llama.cpp's own ``gguf`` package.

Tensor names, metadata and the q/k row order follow llama.cpp's ``convert_hf_to_gguf.py`` for
``LlamaForCausalLM`` (Mistral too) and ``Qwen2ForCausalLM``. Quantized kernels are stored as they
are: a block of 32 inputs with one float16 scale ``d`` holds ``d * q`` for codes ``q`` in -8..7
(``Q4_0``) or -128..127 (``Q8_0``), which is our ``scale * code`` exactly when the scale is a
float16 number and its group spans whole blocks.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from jaxopt_big import quant as _quant
from jaxopt_big.export import _layout

__all__ = ["gguf"]

_INSTEAD = ("GGUF holds symmetric int4 (Q4_0) or int8 (Q8_0) codes with one float16 scale per 32 inputs: "
            "compress with preset gptq-q4_0 or q8_0 (QuantSpec(bits=4 or 8, granularity=Group(32), "
            "scale_dtype='float16'))")

# tokenizer.json pre-tokenizer regexes -> llama.cpp's name for the same pre-tokenizer (llama-vocab.cpp)
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE = {_CONTRACTIONS + r"\p{N}{1,3}" + _REST: "llama-bpe", _CONTRACTIONS + r"\p{N}" + _REST: "qwen2"}


def check_spec(path: str, spec: Any, shape: tuple[int, ...]) -> None:
    """Raises the ValueError :func:`gguf` would raise for a ``(in, out)`` kernel quantized on ``spec``,
    before any quantization runs (the command line checks a recipe so, ahead of minutes of compression)."""
    g = getattr(spec, "granularity", None)
    if not isinstance(spec, _quant.QuantSpec) or isinstance(g, _quant.PerToken) or len(shape) != 2:
        problem = f"{spec!r} is not an integer grid GGUF stores"
    elif not spec.symmetric:
        problem = "an affine grid (zero points) has no exact GGUF type"
    elif spec.scale_dtype != np.float16:
        problem = "scales are not float16 numbers (set scale_dtype='float16')"
    else:
        span = g.span(shape[0]) if isinstance(g, _quant.Group) else shape[0]
        along = g.along % 2 if isinstance(g, _quant.Group) else 0
        if span % 32 or along != 0 or spec.axis % 2 != 1:
            problem = f"scales per {span} of {shape[0]} inputs do not cover whole blocks of 32"
        else:
            return
    raise ValueError(f"{path}: {problem}; {_INSTEAD}")


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs (``LlamaModel.permute`` in the converter).

    Acts on the output rows only, so codes and per-row block scales permute alike.
    """
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _blocks(c: _layout.Codes, path: str) -> tuple[np.ndarray, Any]:
    """``(bytes (out, in / 32 * block bytes), Q4_0 or Q8_0)`` of a quantized kernel, or ValueError."""
    import gguf

    out, d_in = c.codes.shape
    if c.zero_point is not None:
        raise ValueError(f"{path}: an affine grid (zero points) has no exact GGUF type; {_INSTEAD}")
    if d_in % 32 or c.group % 32:
        raise ValueError(f"{path}: scales per {c.group} of {d_in} inputs do not cover whole blocks of 32; {_INSTEAD}")
    d = np.repeat(c.scale, c.group // 32, axis=1)
    if not np.array_equal(d.astype(np.float16).astype(np.float32), d):
        raise ValueError(f"{path}: scales are not float16 numbers (GGUF stores float16 block scales); {_INSTEAD}")
    d = d.astype(np.float16).view(np.uint8).reshape(out, -1, 2)
    q = c.codes.reshape(out, -1, 32)
    if c.bits <= 4:  # byte j of a block: code j (low nibble) and code j + 16 (high nibble), offset by 8
        u = (q + 8).astype(np.uint8)
        return np.concatenate([d, u[..., :16] | (u[..., 16:] << 4)], axis=-1).reshape(out, -1), \
            gguf.GGMLQuantizationType.Q4_0
    return np.concatenate([d, q.view(np.uint8)], axis=-1).reshape(out, -1), gguf.GGMLQuantizationType.Q8_0


def _float(value: np.ndarray) -> tuple[np.ndarray, Any]:
    import gguf

    if value.ndim == 1 or value.dtype == np.float32:
        return value.astype(np.float32), None  # norms and biases are F32, as the converter writes them
    if value.dtype == np.float16:
        return value, None
    if value.dtype.name == "bfloat16":
        return gguf.quants.quantize(value.astype(np.float32), gguf.GGMLQuantizationType.BF16), \
            gguf.GGMLQuantizationType.BF16
    return value.astype(np.float32), None


def _tokenizer_json(tokenizer: str | os.PathLike[str]) -> pathlib.Path:
    path = pathlib.Path(tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist (give tokenizer.json or its folder)")
    return path


def _pre_tokenizer(spec: dict[str, Any] | None, where: pathlib.Path) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or ValueError."""
    steps = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps if s]
    if "ByteLevel" not in kinds:
        raise ValueError(f"{where}: pre-tokenizer {kinds} is not byte-level BPE; GGUF export writes byte-level "
                         "BPE vocabularies (tokenizer.ggml.model 'gpt2') only: pass tokenizer=None to leave it out")
    splits = [s["pattern"].get("Regex") for s in steps if s and s.get("type") == "Split"]
    if not splits:
        if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps if s):
            return "gpt-2"
    elif len(splits) == 1 and splits[0] in _PRE:
        return _PRE[splits[0]]
    raise ValueError(f"{where}: pre-tokenizer split {splits} is none that llama.cpp names here (GPT-2, Llama 3, "
                     "Qwen2); pass tokenizer=None to leave the tokenizer out")


def _vocabulary(tokenizer: pathlib.Path, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, pre-tokenizer) as llama.cpp's converter writes a 'gpt2' vocabulary."""
    import gguf

    spec = json.loads(tokenizer.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer}: tokenizer model {model.get('type')!r} is not BPE; GGUF export writes "
                         "byte-level BPE vocabularies only: pass tokenizer=None to leave it out")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), tokenizer)
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    ids.update({content: t["id"] for content, t in added.items()})
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"{tokenizer}: token id {max(ids.values())} does not fit the model's vocab_size={vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids no token uses, as the converter names them
    types = [int(gguf.TokenType.USER_DEFINED)] * vocab_size
    for token, i in ids.items():
        tokens[i] = token
        special = added.get(token, {}).get("special")
        types[i] = int(gguf.TokenType.NORMAL if token not in added else
                       gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre


def _special_ids(tokenizer: pathlib.Path) -> dict[str, Any]:
    """bos/eos ids from the ``config.json`` beside the tokenizer, ``add_bos_token`` from ``tokenizer_config.json``."""
    out: dict[str, Any] = {}
    sources = (("config.json", ("bos_token_id", "eos_token_id")), ("tokenizer_config.json", ("add_bos_token",)))
    for name, keys in sources:
        file = tokenizer.with_name(name)
        if file.is_file():
            config = json.loads(file.read_text())
            out.update({k: config[k] for k in keys if isinstance(config.get(k), (int, bool))})
    return out


def gguf(path: str | os.PathLike[str], model: Any, params: Any, *,
         tokenizer: str | os.PathLike[str] | None = None, bos_id: int | None = None,
         eos_id: int | None = None) -> dict[str, str]:
    """Writes a compressed Llama / Qwen2 / Mistral as one GGUF file that llama.cpp loads.

    Quantized kernels are written without re-rounding: symmetric int4 (or narrower) with float16
    scales per group of a multiple of 32 inputs as ``Q4_0``, symmetric int5..int8 as ``Q8_0``
    (presets ``gptq-q4_0`` and ``q8_0`` produce them). Float tensors keep their dtype (float32 as
    ``F32``, float16 ``F16``, bfloat16 ``BF16``; norms and biases ``F32``); other compressed leaves
    (low-rank, pruned) are written as their dense values. Llama and Mistral q/k rows are reordered
    for llama.cpp's rotary layout as its converter does; Mistral's sliding window is not written
    (llama.cpp's converter drops it too: the same model while a sequence fits the window).

    Args:
      path: the ``.gguf`` file; written beside it first and renamed when complete.
      model: an unrolled :class:`jaxopt_big.zoo.Llama` (its config gives the metadata).
      params: its parameters (``nnx.State`` or pure dict), compressed leaves as they are.
      tokenizer: a byte-level BPE ``tokenizer.json`` (or its folder): tokens, types, merges and the
        pre-tokenizer go into the file; bos/eos ids come from the ``config.json`` beside it. None:
        no vocabulary (``tokenizer.ggml.model = "none"``).
      bos_id, eos_id: override those ids.

    Returns:
      ``{tensor name: GGUF type}``, e.g. ``{"blk.0.attn_q.weight": "Q4_0", ...}``.

    Raises:
      ValueError: a quantized kernel GGUF cannot hold exactly (naming it and what to use instead),
        or a tokenizer it cannot describe; nothing is left at ``path`` then.
    """
    import gguf as gg

    config = model.config
    arch = gg.MODEL_ARCH.QWEN2 if config.model_type == "qwen2" else gg.MODEL_ARCH.LLAMA
    names = gg.get_tensor_name_map(arch, config.num_layers)
    vocab = None
    if tokenizer is not None:
        tokenizer = _tokenizer_json(tokenizer)
        vocab = _vocabulary(tokenizer, config.vocab_size)
    data = []
    for t in _layout.tensors(model, params):
        name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{t.path}: llama.cpp has no tensor name for {t.name!r}")
        c = _layout.codes(t, instead=_INSTEAD)
        value, kind = _blocks(c, t.path) if c is not None else _float(t.dense())
        if arch == gg.MODEL_ARCH.LLAMA and t.module.endswith(("q_proj", "k_proj")):
            value = _permute(value, config.num_heads if t.module.endswith("q_proj") else config.num_kv_heads)
        data.append((name, np.ascontiguousarray(value), kind))
    kinds = {k for _, _, k in data}
    file_type = (gg.LlamaFileType.MOSTLY_Q4_0 if gg.GGMLQuantizationType.Q4_0 in kinds else
                 gg.LlamaFileType.MOSTLY_Q8_0 if gg.GGMLQuantizationType.Q8_0 in kinds else
                 gg.LlamaFileType.ALL_F32)
    with _layout.atomic_file(path) as tmp:
        writer = gg.GGUFWriter(tmp, gg.MODEL_ARCH_NAMES[arch])
        _metadata(writer, config, file_type)
        _vocabulary_metadata(writer, vocab, {} if tokenizer is None else _special_ids(tokenizer), bos_id, eos_id)
        for name, value, kind in data:
            writer.add_tensor(name, value, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {name: kind.name if kind is not None else "F16" if value.dtype == np.float16 else "F32"
            for name, value, kind in data}


def _metadata(writer: Any, config: Any, file_type: Any) -> None:
    """The hyperparameters llama.cpp's converter writes for a Llama-family model."""
    import gguf as gg

    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_positions)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gg.GGML_QUANT_VERSION)


def _vocabulary_metadata(writer: Any, vocab: tuple[list[str], list[int], list[str], str] | None,
                         special: dict[str, Any], bos_id: int | None, eos_id: int | None) -> None:
    if vocab is None:
        writer.add_tokenizer_model("none")
    else:
        tokens, types, merges, pre = vocab
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    bos = special.get("bos_token_id") if bos_id is None else bos_id
    eos = special.get("eos_token_id") if eos_id is None else eos_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if "add_bos_token" in special:
        writer.add_add_bos_token(special["add_bos_token"])
