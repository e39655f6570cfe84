"""The plain full KV cache: every token's K/V at slot == its absolute position.

Layout (layers stacked, batch-major)::

    k, v : [L, B, K, S, E]      slot s of row b holds the token at position s
            row b:  | p0 p1 ... p(n_b - 1) | decoded tokens ... | free (masked) |
                      prompt (right-padded)   written at pos_b

A query at position p reads slots <= p only, so right padding of shorter prompts never leaks:
a pad's slot is overwritten by the first decoded token before any query can see it.

Axis letters: l layer, b batch, k KV head, s cache slot, e head dim, t time, g group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wgkv_jax.attention.blocked import blocked_causal_attention, grouped_attention
from wgkv_jax.model.config import ModelConfig

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, E]
    v: jax.Array  # [L, B, K, S, E]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, size, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def size(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def logical_axes() -> KVCache:
        return KVCache(CACHE_AXES, CACHE_AXES)


def prefill_attend(cache: KVCache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
    """Fresh prefill (positions start at 0): causal self-attention, then K/V -> slots [0, T)."""
    del p, k_pre_btke
    out = blocked_causal_attention(q_btkgd, k_btke, v_btke, pos_bt)
    k_bkte = jnp.swapaxes(k_btke, 1, 2).astype(cache.k.dtype)[None]
    v_bkte = jnp.swapaxes(v_btke, 1, 2).astype(cache.v.dtype)[None]
    zero = jnp.zeros((), jnp.int32)
    start = (layer, zero, zero, zero, zero)
    return out, KVCache(
        jax.lax.dynamic_update_slice(cache.k, k_bkte, start), jax.lax.dynamic_update_slice(cache.v, v_bkte, start)
    )


def decode_attend(cache: KVCache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
    """Write the new tokens at their positions (per row), then attend over slots <= position."""
    del p, k_pre_btke
    b = jnp.arange(q_btkgd.shape[0])[:, None]
    k_all = cache.k.at[layer, b, :, pos_bt].set(k_btke.astype(cache.k.dtype), mode="drop")
    v_all = cache.v.at[layer, b, :, pos_bt].set(v_btke.astype(cache.v.dtype), mode="drop")
    slot_s = jnp.arange(cache.size)
    mask_bts = slot_s[None, None, :] <= pos_bt[:, :, None]
    out = grouped_attention(q_btkgd, k_all[layer], v_all[layer], mask_bts)
    return out.astype(v_btke.dtype), KVCache(k_all, v_all)
