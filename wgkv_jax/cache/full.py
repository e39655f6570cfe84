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
from wgkv_jax.kernels import ragged
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


@dataclasses.dataclass(frozen=True)
class FullAttend:
    """`Attend` hook of the full cache.

    phase "prefill": a fresh prompt (positions from 0) attends causally to itself, then its K/V go
    to slots [0, T). phase "decode": the new tokens are written at their positions (per row),
    then attend over slots <= position. `impl` is resolved by `kernels.dispatch`: "reference"
    (XLA), "pallas"/"interpret" (the ragged kernel), "cudnn" (prefill only).
    """

    phase: str = "decode"
    impl: str = "reference"

    def __call__(self, cache: KVCache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        del p, k_pre_btke
        if self.phase == "prefill":
            zero = jnp.zeros((), jnp.int32)
            start = (layer, zero, zero, zero, zero)
            new = KVCache(
                jax.lax.dynamic_update_slice(cache.k, jnp.swapaxes(k_btke, 1, 2).astype(cache.k.dtype)[None], start),
                jax.lax.dynamic_update_slice(cache.v, jnp.swapaxes(v_btke, 1, 2).astype(cache.v.dtype)[None], start),
            )
            if self.impl == "cudnn":
                b, t, k, g, e = q_btkgd.shape
                out = jax.nn.dot_product_attention(
                    q_btkgd.reshape(b, t, k * g, e), k_btke, v_btke, is_causal=True, implementation="cudnn"
                ).reshape(b, t, k, g, e)
            elif self.impl == "reference":
                out = blocked_causal_attention(q_btkgd, k_btke, v_btke, pos_bt)
            elif self.impl == "interpret-xla":
                out = self._kernel(new, layer, q_btkgd, pos_bt, "interpret")
            else:
                out = self._kernel(new, layer, q_btkgd, pos_bt, self.impl)
            return out.astype(v_btke.dtype), new
        b = jnp.arange(q_btkgd.shape[0])[:, None]
        new = KVCache(
            cache.k.at[layer, b, :, pos_bt].set(k_btke.astype(cache.k.dtype), mode="drop"),
            cache.v.at[layer, b, :, pos_bt].set(v_btke.astype(cache.v.dtype), mode="drop"),
        )
        if self.impl == "reference":
            mask_bts = jnp.arange(cache.size)[None, None, :] <= pos_bt[:, :, None]
            out = grouped_attention(q_btkgd, new.k[layer], new.v[layer], mask_bts)
        else:  # the kernel; a one-token step has nothing for cuDNN
            impl = {"cudnn": "pallas", "interpret-xla": "interpret"}.get(self.impl, self.impl)
            out = self._kernel(new, layer, q_btkgd, pos_bt, impl)
        return out.astype(v_btke.dtype), new

    @staticmethod
    def _kernel(cache: KVCache, layer, q_btkgd, pos_bt, impl):
        b, _, k = q_btkgd.shape[:3]
        length_bk = jnp.broadcast_to(jnp.max(pos_bt, axis=1)[:, None] + 1, (b, k))
        return ragged.attend_grouped(
            q_btkgd, pos_bt, None, None, cache.k, cache.v, None, length_bk, layer, window=0, glob_lo=0, impl=impl
        )


prefill_attend = FullAttend("prefill")
decode_attend = FullAttend("decode")
