"""Dense masked attention in float32: the oracle every other attention path is tested against.

Axis letters: b batch, t query time, s key time, k KV head, g query head within a GQA
group, d head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite so that a fully masked row yields zeros-weighted output, never NaN


def masked_attention(q_btkgd, k_bskd, v_bskd, mask_bts, *, scale: float | None = None):
    """softmax(q k^T * scale + mask) v, computed in float32.

    Args:
      q_btkgd: queries [B, T, Hkv, G, D].
      k_bskd, v_bskd: keys and values [B, S, Hkv, D].
      mask_bts: bool [B, T, S] (same for every head) or [B, Hkv, T, S]; True = may attend.
      scale: logit scale, default 1/sqrt(D).

    Returns:
      [B, T, Hkv, G, D] in float32.
    """
    d = q_btkgd.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q = q_btkgd.astype(jnp.float32)
    s_bkgts = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd.astype(jnp.float32)) * scale
    mask = mask_bts[:, None, None] if mask_bts.ndim == 3 else mask_bts[:, :, None]
    s_bkgts = jnp.where(mask, s_bkgts, NEG_INF)
    p_bkgts = jax.nn.softmax(s_bkgts, axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", p_bkgts, v_bskd.astype(jnp.float32))


def causal_mask(q_pos_bt, k_pos_bs):
    """True where key position <= query position. Shapes [B, T], [B, S] -> [B, T, S]."""
    return k_pos_bs[:, None, :] <= q_pos_bt[:, :, None]
