"""wgkv-jax: KV-cache admission (Write-Gated KV) and eviction for long-context inference in JAX.

Public API::

    model = wgkv_jax.load_model("smollm2-135m")      # or an HF directory / .gguf file
    logits = model.logits(token_ids)                  # float32 [B, T, V]
    out = wgkv_jax.generate(model, ["Hello"], max_new_tokens=32)
"""

from wgkv_jax.api import DEFAULT_MODEL, NAMED_MODELS, Model, generate, load_model
from wgkv_jax.infer.generate import ContextLengthError, GenerationResult
from wgkv_jax.infer.sampling import SamplingConfig
from wgkv_jax.model.config import ModelConfig, RopeScaling
from wgkv_jax.sharding import make_mesh
from wgkv_jax.weights import TextTokenizer, UnsupportedModelError, WeightsMismatchError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "NAMED_MODELS",
    "ContextLengthError",
    "GenerationResult",
    "Model",
    "ModelConfig",
    "RopeScaling",
    "SamplingConfig",
    "TextTokenizer",
    "UnsupportedModelError",
    "WeightsMismatchError",
    "generate",
    "load_model",
    "make_mesh",
]
