"""compressed-tensors: safetensors plus a ``quantization_config`` that vLLM and transformers load.

Layout (as the ``compressed-tensors`` package writes and reads it): per quantized Linear
``{module}.weight_scale`` ``(out, in / group)`` and either, in the ``pack-quantized`` format (weight
only, W4A16 / W8A16), ``weight_packed`` int32 ``(out, ceil(in * bits / 32))`` holding ``code + 2^(bits-1)``
as a little-endian bit stream per row, ``weight_shape`` ``[out, in]`` and, for affine grids,
``weight_zero_point`` packed the same way along the output axis; or, in the ``int-quantized``
format (W8A8 with dynamic per-token int8 activations), ``weight`` int8. The weight is
``(code - zero_point) * scale``, which is our ``QArray`` exactly.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np

from jaxopt_big import quant as _quant
from jaxopt_big.export import _layout

__all__ = ["compressed_tensors"]

_INSTEAD = ("compressed-tensors holds int4/int8 codes with scales per output feature or per group of inputs "
            "(e.g. preset gptq-int4 or int8)")
_W8A8 = "W8A8 needs symmetric int8 kernels with one scale per output feature: compress with preset int8"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed ``codes`` ``(rows, cols)`` as compressed-tensors' ``pack_to_int32`` along the last axis.

    Examples:
      >>> pack(np.array([[1, 2]], np.int8), 8).tolist()   # 129 | 130 << 8, as the package documents
      [[33409]]
    """
    rows, cols = codes.shape
    unsigned = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    stream = np.unpackbits(unsigned[..., None], axis=-1, count=bits, bitorder="little").reshape(rows, cols * bits)
    stream = np.pad(stream, [(0, 0), (0, -stream.shape[1] % 32)])
    return np.packbits(stream, axis=-1, bitorder="little").view(np.dtype("<i4"))


def _activations(spec: Any) -> dict[str, Any] | None:
    if spec is None:
        return None
    if not (isinstance(spec, _quant.QuantSpec) and spec.bits == 8 and isinstance(spec.granularity, _quant.PerToken)):
        raise ValueError(f"activations must be None or QuantSpec(bits=8, granularity=PER_TOKEN) (dynamic per-token "
                         f"int8, W8A8), got {spec!r}")
    return {"num_bits": 8, "type": "int", "symmetric": spec.symmetric, "group_size": None, "strategy": "token",
            "dynamic": True}


def _layer_activations(t: _layout.Tensor, activations: Any) -> dict[str, Any] | None:
    """The input format of one quantized Linear: the one its ``QArray`` carries (W8A8), else ``activations``."""
    own = getattr(t.leaf, "activations", None)
    if own is None:
        return _activations(activations)
    if activations is not None and activations != own:
        raise ValueError(f"{t.path}: the kernel quantizes its inputs as {own!r}, not as activations={activations!r}")
    try:
        return _activations(own)
    except ValueError as e:
        raise ValueError(f"{t.path}: {e}") from None


def _quantized(t: _layout.Tensor, c: _layout.Codes, activations: dict[str, Any] | None
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(weight args of the config, tensors) of one quantized Linear."""
    out, d_in = c.codes.shape
    bits = 4 if c.bits <= 4 else 8  # narrower codes are a subset of the int4 range: stored as they are
    grouped = c.scale.shape[1] > 1
    args = {"num_bits": bits, "type": "int", "symmetric": c.zero_point is None,
            "group_size": c.group if grouped else None, "strategy": "group" if grouped else "channel",
            "dynamic": False}
    tensors = {f"{t.module}.weight_scale": c.scale}
    if activations is not None:
        if bits != 8 or grouped or c.zero_point is not None:
            raise ValueError(f"{t.path}: int{c.bits} {'affine ' if c.zero_point is not None else ''}"
                             f"kernel with {c.scale.shape[1]} scales per output; {_W8A8}")
        tensors[f"{t.module}.weight"] = c.codes
        return args, tensors
    tensors[f"{t.module}.weight_packed"] = pack(c.codes, bits)
    tensors[f"{t.module}.weight_shape"] = np.array([out, d_in], np.int64)
    if c.zero_point is not None:
        tensors[f"{t.module}.weight_zero_point"] = np.ascontiguousarray(pack(c.zero_point.T, bits).T)
    return args, tensors


def compressed_tensors(directory: str | os.PathLike[str], model: Any, params: Any, *, activations: Any = None,
                       tokenizer: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Writes a compressed Llama / Qwen2 / Mistral as a compressed-tensors checkpoint folder.

    ``config.json`` (the model's Hugging Face config plus ``quantization_config``) and
    ``model.safetensors``, loadable by vLLM and by transformers (``compressed-tensors`` installed).
    Quantized kernels are written as their codes and scales, unchanged: weight-only
    (``pack-quantized``: W4A16 for int4 and narrower, W8A16 for int5..int8, symmetric or affine, per
    output feature or per group of inputs), or W8A8 (``int-quantized``: int8 per-channel kernels, int8
    activations quantized per token at run time) for kernels that carry that activation format
    (``QuantSpec(..., activations=...)``, the ``w8a8`` and ``smoothquant-int8`` presets) or for all
    with ``activations``. A model mixing both is written as ``mixed-precision``, each group with its
    format. Float tensors are written as they are; Linear layers left float are listed in ``ignore``.

    Args:
      directory: the output folder (must not exist or be empty); it appears only when complete.
      model: an unrolled :class:`jaxopt_big.zoo.Llama`; params: its parameters, compressed leaves as they are.
      activations: None (each kernel as it is: weight-only unless it carries an activation format) or
        ``QuantSpec(bits=8, granularity=PER_TOKEN)`` (W8A8 for every kernel).
      tokenizer: a folder (or its ``tokenizer.json``) whose tokenizer files are copied alongside.

    Returns:
      The ``quantization_config`` written into ``config.json``.

    Raises:
      ValueError: a kernel the format cannot hold exactly (naming it and what to use instead).
    """
    _activations(activations)
    groups: dict[str, dict[str, Any]] = {}
    ignore, tensors = [], {}
    for t in _layout.tensors(model, params):
        c = _layout.codes(t, instead=_INSTEAD)
        if c is None:
            dense = t.dense()
            tensors[t.name] = dense if dense.dtype == np.float16 else dense.astype(np.float32)
            if t.linear:
                ignore.append(t.module)
            continue
        act = _layer_activations(t, activations)
        args, written = _quantized(t, c, act)
        tensors.update(written)
        fmt = "int-quantized" if act is not None else "pack-quantized"
        group = groups.setdefault(json.dumps([args, act], sort_keys=True), {
            "targets": [], "weights": args, "input_activations": act, "output_activations": None, "format": fmt})
        group["targets"].append(t.module)
    formats = {g["format"] for g in groups.values()}
    config = {"quant_method": "compressed-tensors",
              "format": formats.pop() if len(formats) == 1 else "mixed-precision", "quantization_status": "compressed",
              "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
              "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}
    from safetensors.numpy import save_file

    with _layout.atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = {**model.config.to_hf(), "quantization_config": config}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer is not None:
            source = pathlib.Path(tokenizer)
            source = source if source.is_dir() else source.parent
            for name in _TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy(source / name, tmp / name)
    return config
