"""The compressed-tensors package itself decompresses our compressed-tensors export (needs torch:
``pip install jaxopt-big[export-check]``); every quantized weight must equal our densified one exactly.

Run: ``python benchmarks/export_check.py``. Prints one line per format and exits 1 on a mismatch.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from flax import nnx
from safetensors.torch import load_file

import jaxopt_big as jb

CONFIG = jb.zoo.LlamaConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=256)
CASES = {
    "W4A16 symmetric g32": (jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(32)), None),
    "W4A16 asymmetric g32": (jb.quant.QuantSpec(bits=4, symmetric=False, granularity=jb.quant.Group(32)), None),
    "W8A16 per channel": (jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL), None),
    "W8A8 dynamic per token": (jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_CHANNEL),
                               jb.quant.QuantSpec(bits=8, granularity=jb.quant.PER_TOKEN)),
}


def check(name, spec, activations, directory):
    model = jb.zoo.Llama(CONFIG, rngs=nnx.Rngs(0))
    recipe = jb.Recipe([jb.Rule(r"lm_head/.*", None, required=False), jb.Rule(".*", jb.Plan(quant=spec))])
    params = recipe.apply(nnx.state(model, nnx.Param))
    jb.export.compressed_tensors(directory, model, params, activations=activations)
    config = QuantizationConfig.model_validate(json.loads((directory / "config.json").read_text())
                                               ["quantization_config"])
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(str(directory / "model.safetensors"))
    dense = jb.leaves.densify(nnx.to_pure_dict(params))
    worst, count = 0.0, 0
    for group in config.config_groups.values():
        for module in group.targets:
            local = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
            weight = compressor.decompress(local, group)["weight"].to(torch.float32).numpy()
            _, _, i, part, linear = module.split(".")  # model.layers.0.self_attn.q_proj
            ours = np.asarray(dense["layers"][int(i)][part][linear]["kernel"]).T
            worst = max(worst, float(np.abs(weight - ours).max()))
            count += 1
    print(f"{name}: {count} layers decompressed by compressed-tensors, max |difference| = {worst}")
    return worst == 0.0 and count == 7 * CONFIG.num_layers


def main():
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, (spec, activations)) in enumerate(CASES.items()):
            ok &= check(name, spec, activations, Path(tmp) / str(n))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
