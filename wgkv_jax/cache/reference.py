"""The dense oracle of the dual cache: whole-sequence masked attention with the WG-KV mask.

Query i of KV head h attends to A_i = {j <= i : i - j < W} U {j <= i - W : admitted_j}, in
float32 over the full sequence (memory T x T; tests and small checks only). Pad tokens
(negative positions) are neither attended nor admitted, as in the cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wgkv_jax.attention.reference import masked_attention
from wgkv_jax.cache.admission import Admission


def admission_mask(admit_bkt, pos_bt, window: int):
    """bool [B, K, T, S]: the WG-KV attention mask of a sequence with the given admission bits."""
    d_bts = pos_bt[:, :, None] - pos_bt[:, None, :]
    causal_bts = (d_bts >= 0) & (pos_bt[:, None, :] >= 0)
    in_window = (d_bts < window)[:, None]
    return causal_bts[:, None] & (in_window | admit_bkt[:, :, None, :])


@dataclasses.dataclass(frozen=True)
class ReferenceAttend:
    """`Attend` hook computing exact WG-KV attention densely; state collects the bits [L, B, K, T]."""

    admission: Admission
    window: int

    def __call__(self, state, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        admit_bkt, _ = self.admission(layer, p, k_pre_btke, k_btke, v_btke, pos_bt)
        admit_bkt = admit_bkt & (pos_bt >= 0)[:, None, :]
        out = masked_attention(q_btkgd, k_btke, v_btke, admission_mask(admit_bkt, pos_bt, self.window))
        if state is not None:
            state = jax.lax.dynamic_update_index_in_dim(state, admit_bkt, layer, 0)
        return out.astype(v_btke.dtype), state


def reference_logits(params, cfg, tokens_bt, admission: Admission, window: int, pos_bt=None):
    """Float32 logits [B, T, V] and admission bits [L, B, K, T] under exact WG-KV attention."""
    from wgkv_jax.model.transformer import hidden_states, lm_head

    b, t = tokens_bt.shape
    if pos_bt is None:
        pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bits = jnp.zeros((cfg.n_layers, b, cfg.n_kv_heads, t), bool)
    h_btd, bits = hidden_states(params, cfg, tokens_bt, pos_bt, attend=ReferenceAttend(admission, window), state=bits)
    return lm_head(params, cfg, h_btd), bits
