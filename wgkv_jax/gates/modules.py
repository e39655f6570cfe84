"""Write gates: per-layer Flax Linen modules mapping a token's keys to g in (0, 1) per KV head.

Axis letters: b batch, t time, k KV head, e head dim, i gate input features, j hidden units.

The WG-KV gate (arXiv 2512.17452, reference/wgkv.md section 2): for token t of KV head k,

    x = [RMSNorm_pre(k_pre) ; RMSNorm_post(k_post)]          (norm weights shared across heads)
    g = sigmoid(W2_k . GELU(W1_k x + b1_k) + b2_k)           (hidden = head_dim * expand)

Variants change the inputs or the head; every gate has the same call signature,
`gate.apply({"params": p}, k_pre_btke, k_post_btke, v_btke) -> g_bkt`, returning the raw
sigmoid (float32). Training clamps g >= eps; inference admits a token iff g > tau.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu}


def _torch_uniform(fan_in: int):
    """PyTorch's Conv1d/Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class GateRMSNorm(nn.Module):
    """RMSNorm over the head dim with one weight vector shared by all KV heads (float32)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_btke):
        w = self.param("weight", nn.initializers.ones, (x_btke.shape[-1],), jnp.float32)
        x = x_btke.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * w


class WriteGate(nn.Module):
    """The WG-KV gate: normalized pre- and post-RoPE keys -> per-head 2-layer MLP -> sigmoid."""

    num_kv_heads: int
    head_dim: int
    expand: float = 4.0
    act: str = "gelu"
    inputs: tuple[str, ...] = ("pre_k", "post_k")

    def features(self, k_pre_btke, k_post_btke, v_btke):
        """Gate input [B, K, T, I]: the normalized inputs, concatenated in `inputs` order."""
        sources = {"pre_k": k_pre_btke, "post_k": k_post_btke, "v": v_btke}
        unknown = set(self.inputs) - set(sources)
        if unknown:
            raise ValueError(f"unknown gate inputs {sorted(unknown)}; expected a subset of {sorted(sources)}")
        parts = [GateRMSNorm(name=f"{name}_norm")(sources[name]) for name in self.inputs]
        return jnp.swapaxes(jnp.concatenate(parts, axis=-1), 1, 2)

    def head(self, x_bkti):
        """Per-head MLP to one logit per token: [B, K, T, I] -> [B, K, T]."""
        n_in, hidden, k = x_bkti.shape[-1], int(self.head_dim * self.expand), self.num_kv_heads
        w1 = self.param("w1", _torch_uniform(n_in), (k, hidden, n_in))
        b1 = self.param("b1", _torch_uniform(n_in), (k, hidden))
        w2 = self.param("w2", _torch_uniform(hidden), (k, hidden))
        b2 = self.param("b2", _torch_uniform(hidden), (k,))
        h_bktj = _ACTS[self.act](jnp.einsum("bkti,kji->bktj", x_bkti, w1) + b1[:, None])
        return jnp.einsum("bktj,kj->bkt", h_bktj, w2) + b2[:, None]

    @nn.compact
    def __call__(self, k_pre_btke, k_post_btke, v_btke):
        if k_pre_btke.shape[2] != self.num_kv_heads or k_pre_btke.shape[3] != self.head_dim:
            raise ValueError(
                f"gate built for {self.num_kv_heads} KV heads x head_dim {self.head_dim}, got keys of shape "
                f"{tuple(k_pre_btke.shape)} [B, T, K, E]"
            )
        return jax.nn.sigmoid(self.head(self.features(k_pre_btke, k_post_btke, v_btke)))


class ValueWriteGate(WriteGate):
    """Ablation: the value vector is a third input block."""

    inputs: tuple[str, ...] = ("pre_k", "post_k", "v")


class PostRopeWriteGate(WriteGate):
    """Ablation: only the post-RoPE key (position information mixed in)."""

    inputs: tuple[str, ...] = ("post_k",)


class LinearWriteGate(WriteGate):
    """Ablation: no hidden layer, g = sigmoid(w_k . x + b_k)."""

    def head(self, x_bkti):
        n_in, k = x_bkti.shape[-1], self.num_kv_heads
        w = self.param("w", _torch_uniform(n_in), (k, n_in))
        b = self.param("b", _torch_uniform(n_in), (k,))
        return jnp.einsum("bkti,ki->bkt", x_bkti, w) + b[:, None]
