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
import functools

import jax
import jax.numpy as jnp

from wgkv_jax.attention.blocked import blocked_causal_attention, grouped_attention
from wgkv_jax.attention.reference import NEG_INF
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeKVCache:
    """The full cache re-laid out for decode on XLA:CPU: one buffer per layer, batch and KV heads
    merged (n = b * K + k), keys transposed::

        kt[l] : [B * K, E, S]      v[l] : [B * K, S, E]

    XLA:CPU runs q.K^T 4x faster with keys [E, S] than [S, E] (its dot reads the contracted
    axis strided otherwise), and separate per-layer buffers with a single batch axis let the
    attention read each layer's cache in place: from the stacked [L, B, K, S, E] cache XLA first
    copies the layer's slice (and with per-layer [B, K, S, E] buffers it still copies the whole
    buffer around the token write). `generate_ids` prefills into this layout when the layers are
    unrolled and the attention is the XLA reference (`to_cache` gives the stacked view back).
    """

    kt: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    n_kv_heads: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> DecodeKVCache:
        n, e = batch * cfg.n_kv_heads, cfg.head_dim
        kt = tuple(jnp.zeros((n, e, size), dtype) for _ in range(cfg.n_layers))
        v = tuple(jnp.zeros((n, size, e), dtype) for _ in range(cfg.n_layers))
        return cls(kt, v, cfg.n_kv_heads)

    @classmethod
    def from_cache(cls, cache: KVCache) -> DecodeKVCache:
        kt, v = _split_layers(cache)
        return cls(kt, v, cache.k.shape[2])

    def to_cache(self) -> KVCache:
        return _stack_layers(self.kt, self.v, self.n_kv_heads)

    def write(self, layer: int, k_btke, v_btke) -> DecodeKVCache:
        """A prompt's K/V [B, T, K, E] into slots [0, T) of layer `layer`."""
        _check_static(layer)
        b, t, k, e = k_btke.shape
        kt = jnp.transpose(k_btke, (0, 2, 3, 1)).reshape(b * k, e, t).astype(self.kt[layer].dtype)
        v = jnp.swapaxes(v_btke, 1, 2).reshape(b * k, t, e).astype(self.v[layer].dtype)
        kt = jax.lax.dynamic_update_slice(self.kt[layer], kt, (0, 0, 0))
        v = jax.lax.dynamic_update_slice(self.v[layer], v, (0, 0, 0))
        return self.replace_layer(layer, kt, v)

    def replace_layer(self, layer: int, kt, v) -> DecodeKVCache:
        return DecodeKVCache(
            (*self.kt[:layer], kt, *self.kt[layer + 1 :]), (*self.v[:layer], v, *self.v[layer + 1 :]), self.n_kv_heads
        )

    @property
    def size(self) -> int:
        return self.v[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (*self.kt, *self.v))


@jax.jit
def _split_layers(cache: KVCache):
    n_layers, b, k, s, e = cache.k.shape
    kt = jnp.swapaxes(cache.k, 3, 4).reshape(n_layers, b * k, e, s)
    v = cache.v.reshape(n_layers, b * k, s, e)
    return tuple(kt[i] for i in range(n_layers)), tuple(v[i] for i in range(n_layers))


@functools.partial(jax.jit, static_argnums=2)
def _stack_layers(kt, v, n_kv_heads: int) -> KVCache:
    n, e, s = kt[0].shape
    shape = (len(kt), n // n_kv_heads, n_kv_heads, s, e)
    return KVCache(jnp.swapaxes(jnp.stack(kt), 2, 3).reshape(shape), jnp.stack(v).reshape(shape))


def _check_static(layer) -> None:
    if not isinstance(layer, int):
        raise TypeError(
            f"DecodeKVCache needs a static layer index (unrolled layers), got {type(layer).__name__}: load the "
            "model with layers='unrolled' or keep the stacked KVCache"
        )


def _decode_transposed(cache: DecodeKVCache, layer, q_btkgd, k_btke, v_btke, pos_bt):
    """A decode step's attention on the `DecodeKVCache` layout: write the new tokens at their
    positions, then attend over slots <= position (float32 scores and softmax, as
    `grouped_attention`)."""
    _check_static(layer)
    b, t, k, g, e = q_btkgd.shape
    n = b * k
    kt, v = cache.kt[layer], cache.v[layer]
    rows_n1 = jnp.arange(n)[:, None]
    pos_nt = jnp.repeat(pos_bt, k, axis=0)  # row n = b * K + k_head holds row b's positions
    kt = kt.at[rows_n1, :, pos_nt].set(jnp.swapaxes(k_btke, 1, 2).reshape(n, t, e).astype(kt.dtype), mode="drop")
    v = v.at[rows_n1, pos_nt].set(jnp.swapaxes(v_btke, 1, 2).reshape(n, t, e).astype(v.dtype), mode="drop")
    q_nme = jnp.swapaxes(q_btkgd, 1, 2).reshape(n, t * g, e) * e**-0.5
    s_nms = jnp.einsum("nme,nes->nms", q_nme.astype(kt.dtype), kt, preferred_element_type=jnp.float32)
    mask_nms = jnp.arange(kt.shape[-1])[None, None, :] <= jnp.repeat(pos_nt, g, axis=1)[:, :, None]
    p_nms = jax.nn.softmax(jnp.where(mask_nms, s_nms, NEG_INF), axis=-1).astype(v.dtype)
    o_nme = jnp.einsum("nms,nse->nme", p_nms, v, preferred_element_type=jnp.float32)
    out = jnp.swapaxes(o_nme.reshape(b, k, t, g, e), 1, 2)
    return out, cache.replace_layer(layer, kt, v)


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
        if self.phase == "prefill" and isinstance(cache, DecodeKVCache):
            if self.impl != "reference":
                raise ValueError(f"DecodeKVCache runs the XLA reference attention only, not impl={self.impl!r}")
            return blocked_causal_attention(q_btkgd, k_btke, v_btke, pos_bt).astype(v_btke.dtype), cache.write(
                layer, k_btke, v_btke
            )
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
        if isinstance(cache, DecodeKVCache):
            out, new = _decode_transposed(cache, layer, q_btkgd, k_btke, v_btke, pos_bt)
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
