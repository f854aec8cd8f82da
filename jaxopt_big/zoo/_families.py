"""The model families :mod:`jaxopt_big.zoo` loads, by Hugging Face ``model_type``: the one list that the
loaders, :mod:`jaxopt_big.hf` and the command line read."""

DECODERS = ("llama", "qwen2", "mistral")  # Llama: load_llama / save_llama
ENCODERS = ("bert",)                      # Bert: load_bert / save_bert
