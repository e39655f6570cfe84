"""Static model configuration: one frozen dataclass for every Llama-family decoder.

A `ModelConfig` is hashable, so it is passed to jitted functions as a static argument.
Loaders (`wgkv_jax.weights`) build it from an HF `config.json` or from GGUF metadata.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Arch = Literal["llama", "qwen2", "qwen3"]
SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-family transformer.

    Attributes:
      arch: "llama" (Llama 2/3.x, SmolLM2, Mistral-like), "qwen2" (q/k/v bias) or
        "qwen3" (per-head RMSNorm on q and k before RoPE).
      vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim: sizes.
      rope_theta: RoPE base. rope_scaling: optional llama3 scaling.
      rope_freq_factors: explicit per-frequency divisors (GGUF `rope_freqs.weight`);
        overrides `rope_scaling` when given.
      rms_eps: RMSNorm epsilon. tie_embeddings: LM head reuses the embedding matrix.
      qkv_bias: q/k/v projections carry a bias. qk_norm: RMSNorm on q and k per head.
      max_seq_len: context limit of the model (positions >= this are rejected).
      name: human-readable name for reports.
    """

    arch: Arch = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    max_seq_len: int = 8192
    name: str = "tiny"

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}; expected one of {SUPPORTED_ARCHS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA groups)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.n_heads // self.n_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V for one token across all layers and KV heads."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes
