"""Token sampling: greedy, temperature, top-k, top-p (nucleus). Axis letters: b batch, v vocab."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy. top_k 0 = off. top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits_bv, key, cfg: SamplingConfig):
    """Next token ids int32 [B] from float32 logits [B, V]."""
    if cfg.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth_b1 = jax.lax.top_k(logits_bv, cfg.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)
    if cfg.top_p < 1.0:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        cum_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        n_keep_b1 = jnp.sum(cum_bv - jax.nn.softmax(sorted_bv, axis=-1) < cfg.top_p, axis=-1, keepdims=True)
        cutoff_b1 = jnp.take_along_axis(sorted_bv, n_keep_b1 - 1, axis=-1)
        logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)
