"""wgkv-jax: KV-cache admission (Write-Gated KV) and eviction for long-context inference in JAX.

Public API::

    model = wgkv_jax.load_model("smollm2-135m")      # or an HF directory / .gguf file
    logits = model.logits(token_ids)                  # float32 [B, T, V]
    out = wgkv_jax.generate(model, ["Hello"], max_new_tokens=32)                 # full KV cache
    out = wgkv_jax.generate(model, [long_text], cache=wgkv_jax.CacheConfig())  # WG-KV dual cache
    print(out.cache_stats.summary())
    policy = wgkv_jax.policies.get("snapkv", keep_ratio=0.25)    # eviction scoring + exact budgets
"""

from wgkv_jax import policies
from wgkv_jax.api import (
    DEFAULT_MODEL,
    NAMED_MODELS,
    Gate,
    Model,
    context_logprobs,
    generate,
    kvzip_head_scores,
    load_gate,
    load_model,
    prefill_context,
)
from wgkv_jax.cache import CacheConfig, CapacityError, FixedAdmission, GateAdmission
from wgkv_jax.infer.generate import CacheStats, ContextLengthError, GenerationResult, PrefilledContext
from wgkv_jax.infer.sampling import SamplingConfig
from wgkv_jax.model.config import ModelConfig, RopeScaling
from wgkv_jax.sharding import make_mesh
from wgkv_jax.weights import TextTokenizer, UnsupportedModelError, WeightsMismatchError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "NAMED_MODELS",
    "CacheConfig",
    "CacheStats",
    "CapacityError",
    "ContextLengthError",
    "FixedAdmission",
    "Gate",
    "GateAdmission",
    "GenerationResult",
    "Model",
    "ModelConfig",
    "PrefilledContext",
    "RopeScaling",
    "SamplingConfig",
    "TextTokenizer",
    "UnsupportedModelError",
    "WeightsMismatchError",
    "context_logprobs",
    "generate",
    "kvzip_head_scores",
    "load_gate",
    "load_model",
    "make_mesh",
    "policies",
    "prefill_context",
]
