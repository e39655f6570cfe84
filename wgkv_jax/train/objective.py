"""The WG-KV training objective: distillation of the frozen model into its soft-gated self.

    L = MSE(h_student, h_teacher) + lambda * L_sparsity

h are final-norm hidden states [B, T, D]. L_sparsity follows the official code form (the one
the published lambda values refer to; reference/wgkv.md section 3.1): for key position s of a
length-T sample,

    offset_s = min(W / (T - s), 1)     scale_s = 1 - offset_s
    L_sparsity = mean_{l,b,k,s} [ offset_s + scale_s * (2 g - g^2) ]

so the last W keys (seen only inside the window) get no sparsity gradient.

Axis letters: l layer, b batch, k KV head, t/s time, d model width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wgkv_jax.attention.soft_gate import DEFAULT_EPS, soft_gated_attention, soft_gated_attention_reference
from wgkv_jax.gates.modules import WriteGate
from wgkv_jax.kernels.soft_flash import soft_flash_attention
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params, hidden_states


def sparsity_weights(t: int, window: int):
    """(offset_s, scale_s) for s in [0, T): the share of future queries that see key s in the window."""
    s = jnp.arange(t, dtype=jnp.float32)
    offset = jnp.minimum(window / (t - s), 1.0)
    return offset, 1.0 - offset


def sparsity_loss(g_lbkt, window: int):
    """Code-form sparsity term (a scalar) from the stacked gates [L, B, K, T]."""
    offset_t, scale_t = sparsity_weights(g_lbkt.shape[-1], window)
    g = g_lbkt.astype(jnp.float32)
    return jnp.mean(offset_t + scale_t * (2.0 * g - g * g))


def distill_loss(h_student_btd, h_teacher_btd):
    diff = h_student_btd.astype(jnp.float32) - h_teacher_btd.astype(jnp.float32)
    return jnp.mean(diff * diff)


@dataclasses.dataclass(frozen=True)
class SoftGateAttend:
    """`Attend` hook for training: gate every token, bias attention beyond the window, keep g.

    The layer params must hold the gate's params under "gate"; `state` is the stacked gate
    output g [L, B, K, T], filled in layer by layer. `impl` is resolved by
    `kernels.dispatch.soft_impl`: "reference" (the query-blocked XLA path), "pallas" /
    "interpret" (the flash kernels of `kernels.soft_flash`, compiled / on CPU).
    """

    gate: WriteGate
    window: int
    eps: float = DEFAULT_EPS
    block: int = 512
    reference: bool = False  # dense oracle instead of the blocked path (tests)
    impl: str = "reference"

    def __call__(self, state, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        with jax.named_scope("gate"):
            g_bkt = self.gate.apply({"params": p["gate"]}, k_pre_btke, k_btke, v_btke)
        if self.reference:
            out = soft_gated_attention_reference(
                q_btkgd, k_btke, v_btke, g_bkt, pos_bt, window=self.window, eps=self.eps
            )
        elif self.impl in ("pallas", "interpret"):
            out = soft_flash_attention(
                q_btkgd, k_btke, v_btke, g_bkt, pos_bt, window=self.window, eps=self.eps,
                interpret=self.impl == "interpret",
            )  # fmt: skip
        else:
            out = soft_gated_attention(
                q_btkgd, k_btke, v_btke, g_bkt, pos_bt, window=self.window, eps=self.eps, block=self.block
            )
        state = jax.lax.dynamic_update_index_in_dim(state, jnp.maximum(g_bkt, self.eps).astype(state.dtype), layer, 0)
        return out.astype(v_btke.dtype), state


def student_hidden(params: Params, gate_params, cfg: ModelConfig, attend: SoftGateAttend, tokens_bt, pos_bt=None):
    """Final-norm hidden states of the soft-gated model and the clamped gates [L, B, K, T]."""
    b, t = tokens_bt.shape
    if pos_bt is None:
        pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    merged = dict(params, layers=dict(params["layers"], gate=gate_params))
    g0 = jnp.zeros((cfg.n_layers, b, cfg.n_kv_heads, t), jnp.float32)
    return hidden_states(merged, cfg, tokens_bt, pos_bt, attend=attend, state=g0)


def admission_rate(g_lbkt, window: int, tau: float):
    """Fraction of hard admissions (g > tau) among the keys that leave the window (s < T - W)."""
    t = g_lbkt.shape[-1]
    beyond_t = jnp.arange(t) < t - window
    admitted = (g_lbkt > tau) & beyond_t
    return jnp.sum(admitted) / jnp.maximum(jnp.sum(jnp.broadcast_to(beyond_t, g_lbkt.shape)), 1)


def wgkv_loss(
    gate_params,
    params: Params,
    cfg: ModelConfig,
    attend: SoftGateAttend,
    tokens_bt,
    h_teacher_btd,
    lam: float,
    tau: float = 0.1,
):
    """Total loss and its parts; differentiate w.r.t. `gate_params` only (the backbone is frozen).

    Parts: distill (MSE), sparsity (code form), g_mean, admit (hard admission rate beyond the window).
    """
    h_btd, g_lbkt = student_hidden(jax.lax.stop_gradient(params), gate_params, cfg, attend, tokens_bt)
    distill = distill_loss(h_btd, h_teacher_btd)
    sparsity = sparsity_loss(g_lbkt, attend.window)
    parts = {
        "distill": distill,
        "sparsity": sparsity,
        "g_mean": jnp.mean(g_lbkt),
        "admit": admission_rate(g_lbkt, attend.window, tau),
    }
    return distill + lam * sparsity, parts
