"""Soft-gated ("write-gated") attention used to train the gates.

Query at position i attending to key j <= i gets logit  q.k / sqrt(E) + b_ij  with

    b_ij = 0                      if i - j < W      (local window: never penalized)
    b_ij = log(max(g_j, eps))     if i - j >= W     (beyond the window: the gate decides)

g depends only on the key and its KV head, so every query head of a GQA group sees the same
bias; g = 1 gives exact causal attention, g -> eps approaches sliding-window attention.

Two implementations of one signature: the dense float32 reference, and a query-blocked one
whose blocks are rematerialized in the backward pass (`jax.checkpoint`), so neither pass holds
a T x T tensor: peak memory is O(block x T) per layer.

Axis letters: b batch, t query time, s key time, k KV head, g group, e head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wgkv_jax.attention.reference import NEG_INF

DEFAULT_EPS = 1e-3


def _bias_and_mask(q_pos_bt, k_pos_bs, logg_bks, window: int):
    """Additive bias [B, K, T, S] and causal mask [B, 1, T, S] for one block of queries."""
    dist_bts = q_pos_bt[:, :, None] - k_pos_bs[:, None, :]
    far_bts = dist_bts >= window
    bias_bkts = jnp.where(far_bts[:, None], logg_bks[:, :, None, :], 0.0)
    return bias_bkts, (dist_bts >= 0)[:, None]


def _block(q_btkge, k_bske, v_bske, q_pos_bt, k_pos_bs, logg_bks, window: int):
    scale = q_btkge.shape[-1] ** -0.5
    s_bkgts = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske, preferred_element_type=jnp.float32) * scale
    bias_bkts, causal_b1ts = _bias_and_mask(q_pos_bt, k_pos_bs, logg_bks, window)
    s_bkgts = jnp.where(causal_b1ts[:, :, None], s_bkgts + bias_bkts[:, :, None], NEG_INF)
    p_bkgts = jax.nn.softmax(s_bkgts, axis=-1)
    return jnp.einsum("bkgts,bske->btkge", p_bkgts.astype(v_bske.dtype), v_bske, preferred_element_type=jnp.float32)


def soft_gated_attention_reference(q_btkge, k_btke, v_btke, g_bkt, pos_bt, *, window: int, eps: float = DEFAULT_EPS):
    """Dense float32 oracle. q [B, T, K, G, E]; k, v [B, T, K, E]; g [B, K, T]; pos [B, T].

    Returns [B, T, K, G, E] float32.
    """
    f32 = jnp.float32
    logg_bks = jnp.log(jnp.maximum(g_bkt.astype(f32), eps))
    return _block(q_btkge.astype(f32), k_btke.astype(f32), v_btke.astype(f32), pos_bt, pos_bt, logg_bks, window)


@functools.partial(jax.jit, static_argnames=("window", "eps", "block"))
def soft_gated_attention(
    q_btkge, k_btke, v_btke, g_bkt, pos_bt, *, window: int, eps: float = DEFAULT_EPS, block: int = 512
):
    """Memory-efficient soft-gated attention (same contract as the reference, output in v's dtype).

    Query blocks run under `lax.map`; each block is checkpointed, so the backward pass recomputes
    its [block x T] scores instead of storing them.
    """
    b, t, k, g, e = q_btkge.shape
    bq = min(block, t)
    n = -(-t // bq)
    pad = n * bq - t
    logg_bks = jnp.log(jnp.maximum(g_bkt.astype(jnp.float32), eps))
    q_pad = jnp.pad(q_btkge, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    pos_pad = jnp.pad(pos_bt, ((0, 0), (0, pad)), constant_values=0)
    q_nbtkge = jnp.moveaxis(q_pad.reshape(b, n, bq, k, g, e), 1, 0)
    pos_nbt = jnp.moveaxis(pos_pad.reshape(b, n, bq), 1, 0)

    @jax.checkpoint
    def one(args):
        q_blk, pos_blk = args
        return _block(q_blk, k_btke, v_btke, pos_blk, pos_bt, logg_bks, window)

    out_nbtkge = jax.lax.map(one, (q_nbtkge, pos_nbt))
    out = jnp.moveaxis(out_nbtkge, 0, 1).reshape(b, n * bq, k, g, e)[:, :t]
    return out.astype(v_btke.dtype)
