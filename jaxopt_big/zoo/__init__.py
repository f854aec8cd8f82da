"""Pretrained architectures and their Hugging Face loaders.

* :class:`Bert` (linen): a BERT sentence encoder, with the shipped all-MiniLM-L6-v2 weights (:func:`minilm`).
* :class:`Llama` (nnx): decoder language models of the Llama, Qwen2 and Mistral families, loaded from
  and saved to Hugging Face ``config.json`` + ``model.safetensors`` directories (:func:`load_llama`,
  :func:`save_llama`), with unrolled or scanned (stacked) blocks; :func:`generate` writes text with
  them over a :class:`KVCache` (in the model's dtype or int8), running compressed kernels packed.

:data:`DECODERS` and :data:`ENCODERS` list the Hugging Face ``model_type`` values each family reads.

``safetensors`` and ``tokenizers`` are imported only when a loader runs, never when ``jaxopt_big`` is
imported. Nothing is ever downloaded.
"""

from jaxopt_big.zoo._bert import (MINILM_PACKAGE, Bert, BertConfig, load_bert, load_tokenizer, minilm, save_bert,
                                  tokenize)
from jaxopt_big.zoo._families import DECODERS, ENCODERS
from jaxopt_big.zoo._generate import Generation, generate
from jaxopt_big.zoo._kvcache import CacheFormat, KVCache
from jaxopt_big.zoo._llama import DecoderLayer, Llama, LlamaConfig, load_llama, save_llama
from jaxopt_big.zoo._rotate import rotate


__all__ = ["DECODERS", "ENCODERS",
           "BertConfig", "Bert", "load_bert", "save_bert", "load_tokenizer", "tokenize", "minilm", "MINILM_PACKAGE",
           "LlamaConfig", "Llama", "DecoderLayer", "load_llama", "save_llama", "generate", "Generation", "CacheFormat",
           "KVCache", "rotate"]
