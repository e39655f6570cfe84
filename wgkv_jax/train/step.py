"""Jitted training and validation steps for the write gates (backbone frozen, data-parallel).

Only the gate params are differentiated (a params split: gradients of the backbone are never
formed). On a mesh, the token batch is sharded over `data`, the gate params and optimizer state
are replicated, and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params, hidden_states
from wgkv_jax.train.objective import SoftGateAttend, wgkv_loss


def make_optimizer(lr: float, weight_decay: float, steps: int, warmup_frac: float) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to 0 (the paper's WSD schedule has no stable phase)."""
    warmup = max(1, int(warmup_frac * steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.0)
    return optax.adamw(schedule, weight_decay=weight_decay)


def teacher_hidden(params: Params, cfg: ModelConfig, tokens_bt):
    """Final-norm hidden states of the frozen full-attention model (the distillation target)."""
    b, t = tokens_bt.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return jax.lax.stop_gradient(hidden_states(params, cfg, tokens_bt, pos_bt)[0])


@functools.partial(
    jax.jit, static_argnames=("cfg", "attend", "optimizer", "lam", "tau"), donate_argnames=("gate_params", "opt_state")
)
def train_step(
    gate_params,
    opt_state,
    params: Params,
    tokens_bt,
    *,
    cfg: ModelConfig,
    attend: SoftGateAttend,
    optimizer: optax.GradientTransformation,
    lam: float,
    tau: float,
):
    """One AdamW step on the gates. Returns (gate_params, opt_state, metrics)."""
    h_teacher = teacher_hidden(params, cfg, tokens_bt)
    grad_fn = jax.value_and_grad(wgkv_loss, has_aux=True)
    (loss, parts), grads = grad_fn(gate_params, params, cfg, attend, tokens_bt, h_teacher, lam, tau)
    updates, opt_state = optimizer.update(grads, opt_state, gate_params)
    gate_params = optax.apply_updates(gate_params, updates)
    metrics = dict(parts, loss=loss, grad_norm=optax.tree.norm(grads))
    return gate_params, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "attend", "lam", "tau"))
def eval_step(
    gate_params, params: Params, tokens_bt, *, cfg: ModelConfig, attend: SoftGateAttend, lam: float, tau: float
):
    """Validation metrics of the soft-gated student on one batch (no update)."""
    h_teacher = teacher_hidden(params, cfg, tokens_bt)
    loss, parts = wgkv_loss(gate_params, params, cfg, attend, tokens_bt, h_teacher, lam, tau)
    return dict(parts, loss=loss)
