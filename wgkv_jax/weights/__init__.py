"""Loading real weights offline: HF safetensors directories, GGUF files, tokenizers."""

from wgkv_jax.weights.convert import WeightsMismatchError
from wgkv_jax.weights.gguf_io import load_gguf
from wgkv_jax.weights.safetensors_io import UnsupportedModelError, config_from_hf, load_hf_dir
from wgkv_jax.weights.tokenizer import TextTokenizer

__all__ = [
    "TextTokenizer",
    "UnsupportedModelError",
    "WeightsMismatchError",
    "config_from_hf",
    "load_gguf",
    "load_hf_dir",
]
