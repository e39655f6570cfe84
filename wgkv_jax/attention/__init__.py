"""Attention paths: the dense float32 reference and the blocked causal prefill."""

from wgkv_jax.attention.blocked import blocked_causal_attention
from wgkv_jax.attention.reference import causal_mask, masked_attention

__all__ = ["blocked_causal_attention", "causal_mask", "masked_attention"]
