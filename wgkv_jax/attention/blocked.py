"""Causal self-attention in query blocks that skip the key blocks above the diagonal.

Query block i (rows [i*bq, (i+1)*bq)) only reads keys [0, (i+1)*bq): half the FLOPs of the
dense form and never a full T x T score tensor. The blocks are a static Python loop, so every
slice has a static shape; positions still decide the mask, so right-padded rows are exact.

Layout: the G query heads of a KV head and the block's time steps are folded into one row axis
m = (t, g), so each (b, k) is a plain [m, e] x [e, s] matmul against keys stored [b, k, s, e]
(XLA:CPU turns the unfolded form into slow transposing dots).

Axis letters: b batch, t query time, s key time, k KV head, g group, e head dim, m = (t, g).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wgkv_jax.attention.reference import NEG_INF


def grouped_attention(q_btkge, k_bkse, v_bkse, mask_bts):
    """Masked softmax attention of queries [B, T, K, G, E] over keys/values [B, K, S, E].

    mask_bts: bool [B, T, S], shared by all heads. Scores and softmax in float32; returns
    [B, T, K, G, E] float32.
    """
    b, t, k, g, e = q_btkge.shape
    q_bkme = jnp.swapaxes(q_btkge, 1, 2).reshape(b, k, t * g, e) * e**-0.5
    s_bkms = jnp.einsum("bkme,bkse->bkms", q_bkme, k_bkse, preferred_element_type=jnp.float32)
    mask_bms = jnp.repeat(mask_bts, g, axis=1)
    s_bkms = jnp.where(mask_bms[:, None], s_bkms, NEG_INF)
    p_bkms = jax.nn.softmax(s_bkms, axis=-1).astype(v_bkse.dtype)
    o_bkme = jnp.einsum("bkms,bkse->bkme", p_bkms, v_bkse, preferred_element_type=jnp.float32)
    return jnp.swapaxes(o_bkme.reshape(b, k, t, g, e), 1, 2)


def blocked_causal_attention(q_btkgd, k_btkd, v_btkd, pos_bt, *, block: int = 256):
    """Causal attention of a sequence over itself; equals `masked_attention` with `causal_mask`.

    Args:
      q_btkgd: [B, T, Hkv, G, D]; k_btkd, v_btkd: [B, T, Hkv, D]; pos_bt: int [B, T], the
        absolute positions of the tokens (non-decreasing along T for every row).
      block: query block size (static).

    Returns:
      [B, T, Hkv, G, D] in the dtype of v; scores and softmax run in float32.
    """
    t = q_btkgd.shape[1]
    k_bkse, v_bkse = jnp.swapaxes(k_btkd, 1, 2), jnp.swapaxes(v_btkd, 1, 2)
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        mask_bts = pos_bt[:, None, :stop] <= pos_bt[:, start:stop, None]
        outs.append(grouped_attention(q_btkgd[:, start:stop], k_bkse[:, :, :stop], v_bkse[:, :, :stop], mask_bts))
    return jnp.concatenate(outs, axis=1).astype(v_btkd.dtype)
