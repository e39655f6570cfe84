"""Llama-family decoder (Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3) as pure functions."""

from wgkv_jax.model.config import ModelConfig, RopeScaling
from wgkv_jax.model.transformer import (
    Attend,
    Params,
    apply_rope,
    causal_self_attend,
    forward,
    hidden_states,
    init_params,
    lm_head,
    param_logical_axes,
    param_shapes,
    rms_norm,
    rope_inv_freq,
)

__all__ = [
    "Attend",
    "ModelConfig",
    "Params",
    "RopeScaling",
    "apply_rope",
    "causal_self_attend",
    "forward",
    "hidden_states",
    "init_params",
    "lm_head",
    "param_logical_axes",
    "param_shapes",
    "rms_norm",
    "rope_inv_freq",
]
