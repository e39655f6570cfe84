"""Hard-admission evaluation of gates: perplexity and KV ratio under the exact WG-KV semantics.

Query i of KV head h attends to {j <= i : i - j < W} U {j <= i - W : admitted_j}; this is the
soft-gated attention with g in {0, 1} and a vanishing clamp, so it is the dense oracle of what
the dual cache computes. Admission comes from a trained gate (g > tau) or from a baseline:
full (everything), local (window only) or random (Bernoulli at a given rate, per layer/head/token).

Axis letters: l layer, b batch, k KV head, t time, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from wgkv_jax.attention.soft_gate import soft_gated_attention
from wgkv_jax.gates.modules import WriteGate
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params, hidden_states, lm_head

HARD_EPS = 1e-30  # log(1e-30) = -69: a rejected key keeps e^-69 of its weight, i.e. none


@dataclasses.dataclass(frozen=True)
class AdmissionAttend:
    """`Attend` hook applying hard admission; `state` collects the admission bits [L, B, K, T]."""

    mode: Literal["gate", "full", "local", "random"]
    window: int
    gate: WriteGate | None = None
    tau: float = 0.1
    rate: float = 0.0
    seed: int = 0
    block: int = 512

    def __call__(self, state, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        b, t, k = k_btke.shape[:3]
        if self.mode == "gate":
            admit_bkt = self.gate.apply({"params": p["gate"]}, k_pre_btke, k_btke, v_btke) > self.tau
        elif self.mode == "full":
            admit_bkt = jnp.ones((b, k, t), bool)
        elif self.mode == "local":
            admit_bkt = jnp.zeros((b, k, t), bool)
        elif self.mode == "random":
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), layer)
            admit_bkt = jax.random.bernoulli(key, self.rate, (b, k, t))
        else:
            raise ValueError(f"unknown admission mode {self.mode!r}; expected gate, full, local or random")
        g_bkt = admit_bkt.astype(jnp.float32)
        out = soft_gated_attention(
            q_btkgd, k_btke, v_btke, g_bkt, pos_bt, window=self.window, eps=HARD_EPS, block=self.block
        )
        return out.astype(v_btke.dtype), jax.lax.dynamic_update_index_in_dim(state, admit_bkt, layer, 0)


@functools.partial(jax.jit, static_argnames=("cfg", "attend"))
def admission_nll(params: Params, gate_params, tokens_bt, *, cfg: ModelConfig, attend: AdmissionAttend):
    """Summed next-token NLL, token count and admission bits [L, B, K, T] under hard admission."""
    b, t = tokens_bt.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    layers = dict(params["layers"], gate=gate_params) if gate_params is not None else params["layers"]
    admit0 = jnp.zeros((cfg.n_layers, b, cfg.n_kv_heads, t), bool)
    h_btd, admit = hidden_states(dict(params, layers=layers), cfg, tokens_bt, pos_bt, attend=attend, state=admit0)
    logits_btv = lm_head(params, cfg, h_btd[:, :-1])
    logp_bt = jax.nn.log_softmax(logits_btv, axis=-1)
    nll = -jnp.take_along_axis(logp_bt, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll), nll.size, admit


def kv_ratio(admit_lbkt, window: int):
    """Stored KV entries / full-cache entries at the end of the sequence, local window included
    (the paper's accounting): (min(T, W) + admitted keys among the first T - W) / T."""
    t = admit_lbkt.shape[-1]
    beyond = jnp.arange(t) < t - window
    stored = jnp.minimum(t, window) + jnp.sum(admit_lbkt & beyond, axis=-1)
    return jnp.mean(stored / t)
