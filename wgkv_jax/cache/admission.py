"""Admission sources: who decides, per (layer, KV head, token), whether a key enters the global cache.

Every source is a frozen (hashable, jit-static) callable

    admit_bkt, score_bkt = source(layer, p, k_pre_btke, k_btke, v_btke, pos_bt)

returning the admission bit and a score in [0, 1] that eviction rules rank by (higher = keep).
A token's decision depends only on that token (its keys, value, position, layer and head), so a
prefill, a chunked prefill and a decode loop all reach the same decisions.

- `GateAdmission`: a trained write gate, admit iff g > tau (reference/wgkv.md section 4.1).
- `FixedAdmission`: baselines and test masks: "all" (full attention), "none" (window only),
  "random" (a hash of seed, layer, head and position, so it is reproducible across paths).

Axis letters: b batch, t time, k KV head, e head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

import jax.numpy as jnp

from wgkv_jax.gates.modules import WriteGate


class Admission(Protocol):
    def __call__(self, layer, p, k_pre_btke, k_btke, v_btke, pos_bt) -> tuple: ...


@dataclasses.dataclass(frozen=True)
class GateAdmission:
    """Admit iff the layer's write gate (params at p["gate"]) gives g > tau; the score is g."""

    gate: WriteGate
    tau: float = 0.1

    def __call__(self, layer, p, k_pre_btke, k_btke, v_btke, pos_bt):
        del layer, pos_bt
        if "gate" not in p:
            raise ValueError("GateAdmission needs the gate params beside the layer params (layers['gate'])")
        g_bkt = self.gate.apply({"params": p["gate"]}, k_pre_btke, k_btke, v_btke)
        return g_bkt > self.tau, g_bkt


def _mix32(x):
    """A 32-bit integer hash (murmur3 finalizer) on uint32 arrays."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True)
class FixedAdmission:
    """A fixed admission rule: "all", "none", or "random" at `rate` (hash of seed/layer/head/pos)."""

    mode: Literal["all", "none", "random"]
    rate: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("all", "none", "random"):
            raise ValueError(f"unknown fixed admission {self.mode!r}; expected 'all', 'none' or 'random'")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"admission rate {self.rate} must be in [0, 1]")

    def __call__(self, layer, p, k_pre_btke, k_btke, v_btke, pos_bt):
        del p, k_pre_btke, v_btke
        b, t, k = k_btke.shape[:3]
        if self.mode != "random":
            value = self.mode == "all"
            return jnp.full((b, k, t), value), jnp.full((b, k, t), float(value), jnp.float32)
        head_k = jnp.arange(k, dtype=jnp.uint32)[None, :, None]
        pos = pos_bt.astype(jnp.uint32)[:, None, :]
        salt = _mix32(jnp.uint32(self.seed) * jnp.uint32(0x9E3779B9) + jnp.asarray(layer).astype(jnp.uint32))
        u_bkt = (
            _mix32(_mix32(pos * jnp.uint32(0x9E3779B9) ^ salt) ^ _mix32(head_k + salt)).astype(jnp.float32) / 2.0**32
        )
        return u_bkt < self.rate, 1.0 - u_bkt
