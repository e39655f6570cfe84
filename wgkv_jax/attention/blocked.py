"""Causal self-attention in query blocks that skip the key blocks above the diagonal.

Query block i (rows [i*bq, (i+1)*bq)) only reads keys [0, (i+1)*bq): half the FLOPs of the
dense form and never a full T x T score tensor. The blocks are a static Python loop, so every
slice has a static shape; positions still decide the mask, so right-padded rows are exact.

Axis letters: b batch, t query time, s key time, k KV head, g group, d head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wgkv_jax.attention.reference import NEG_INF


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
    scale = q_btkgd.shape[-1] ** -0.5
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        q = q_btkgd[:, start:stop]
        k, v = k_btkd[:, :stop], v_btkd[:, :stop]
        s_bkgts = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
        mask_bts = pos_bt[:, None, :stop] <= pos_bt[:, start:stop, None]
        s_bkgts = jnp.where(mask_bts[:, None, None], s_bkgts, NEG_INF)
        p_bkgts = jax.nn.softmax(s_bkgts, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bskd->btkgd", p_bkgts, v, preferred_element_type=jnp.float32))
    return jnp.concatenate(outs, axis=1).astype(v_btkd.dtype)
