"""Exports that serving engines load: GGUF for llama.cpp, compressed-tensors for vLLM and transformers.

Both write our quantized kernels as they are, without re-rounding, and refuse (``ValueError`` naming
the layer and what to use instead) a kernel the format cannot hold exactly; nothing half-written is
left behind. The ``gguf`` package (llama.cpp's own writer) is needed for GGUF, ``safetensors`` for
compressed-tensors (``pip install jaxopt-big[export]``).

Examples:
  >>> import jax, jax.numpy as jnp, jaxopt_big as jb, tempfile, pathlib
  >>> from flax import nnx
  >>> c = jb.zoo.LlamaConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
  ...                        intermediate_size=64)
  >>> model = jb.zoo.Llama(c, rngs=nnx.Rngs(0))
  >>> params = jb.recipe.preset("q8_0").apply(nnx.state(model, nnx.Param))
  >>> out = pathlib.Path(tempfile.mkdtemp())
  >>> jb.export.gguf(out / "model.gguf", model, params)["blk.0.ffn_up.weight"]
  'Q8_0'
  >>> bad = jb.Recipe([jb.Rule(".*", jb.Plan(quant=jb.quant.QuantSpec(bits=4, granularity=jb.quant.Group(32))))])
  >>> jb.export.gguf(out / "bad.gguf", model, bad.apply(nnx.state(model, nnx.Param)))
  Traceback (most recent call last):
  ...
  ValueError: layers/0/mlp/down_proj/kernel: scales are not float16 numbers ...
  >>> sorted(p.name for p in out.iterdir())
  ['model.gguf']
"""

from jaxopt_big.export._compressed_tensors import compressed_tensors
from jaxopt_big.export._gguf import gguf
from jaxopt_big.export._write import FORMATS, check, write

__all__ = ["gguf", "compressed_tensors", "FORMATS", "write", "check"]
