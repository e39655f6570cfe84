"""Write gates and soft-gated training attention: invariants from reference/wgkv.md."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_LLAMA, TINY_QWEN3

from configs.models import LLAMA31_8B, QWEN3_4B
from wgkv_jax import gates
from wgkv_jax.attention import causal_mask, masked_attention
from wgkv_jax.attention.soft_gate import soft_gated_attention, soft_gated_attention_reference
from wgkv_jax.model import hidden_states, init_params
from wgkv_jax.train import SoftGateAttend, sparsity_loss, sparsity_weights, student_hidden, wgkv_loss


def qkv(b=2, t=37, k=2, g=3, e=8, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    gate = jnp.asarray(rng.uniform(0.0, 1.0, size=(b, k, t)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return f(b, t, k, g, e), f(b, t, k, e), f(b, t, k, e), gate, pos


# ----------------------------------------------------------------------------- gate modules


@pytest.mark.parametrize("name", sorted(gates.GATES))
def test_every_registered_gate_has_the_interface(name):
    gate = gates.make(name, TINY_QWEN3)
    params = gates.init_stacked(gate, TINY_QWEN3, jax.random.PRNGKey(0))
    assert all(x.shape[0] == TINY_QWEN3.n_layers for x in jax.tree.leaves(params))
    _, k, v, _, _ = qkv(t=11, k=TINY_QWEN3.n_kv_heads, e=TINY_QWEN3.head_dim)
    layer0 = jax.tree.map(lambda x: x[0], params)
    g = gate.apply({"params": layer0}, k, k * 0.5, v)
    assert g.shape == (2, TINY_QWEN3.n_kv_heads, 11) and g.dtype == jnp.float32
    assert bool(jnp.all((g > 0) & (g < 1)))


def test_gate_inputs_matter_per_variant():
    """post_rope ignores the pre-RoPE key; wgkv_v reads the value; wgkv ignores it."""
    _, k, v, _, _ = qkv(t=9, k=2, e=16)
    k2 = k + 1.0
    for name, changes_with_pre, changes_with_v in [
        ("wgkv", True, False),
        ("post_rope", False, False),
        ("wgkv_v", True, True),
    ]:
        gate = gates.make(name, TINY_LLAMA)
        p = gate.init(jax.random.PRNGKey(1), k, k, v)["params"]
        base = gate.apply({"params": p}, k, k, v)
        assert bool(jnp.any(gate.apply({"params": p}, k2, k, v) != base)) == changes_with_pre, name
        assert bool(jnp.any(gate.apply({"params": p}, k, k, v * 2 + 1) != base)) == changes_with_v, name


def test_parameter_count_matches_paper_arithmetic():
    """reference/wgkv.md 2.5: 1,057,032 per layer for Llama-3.1-8B (expand 4), 396,552 for Qwen3-4B (1.5)."""
    x8 = jnp.zeros((1, 1, 8, 128))
    for cfg, expand, want in [(LLAMA31_8B, 4.0, 1_057_032), (QWEN3_4B, 1.5, 396_552)]:
        gate = gates.make("wgkv", cfg, expand=expand)
        shapes = jax.eval_shape(lambda g=gate: g.init(jax.random.PRNGKey(0), x8, x8, x8)["params"])
        assert gates.param_count(shapes) == want


def test_gate_errors():
    with pytest.raises(KeyError, match="unknown gate 'mlp3'"):
        gates.make("mlp3", TINY_LLAMA)
    gate = gates.make("wgkv", TINY_LLAMA)
    _, k, v, _, _ = qkv(k=3, e=16)
    with pytest.raises(ValueError, match="gate built for 2 KV heads x head_dim 16"):
        gate.init(jax.random.PRNGKey(0), k, k, v)


# ----------------------------------------------------------------------------- soft-gated attention


@pytest.mark.parametrize(
    "t, window, block, group", [(37, 5, 8, 3), (16, 1, 16, 1), (50, 64, 7, 1), (33, 8, 512, 3)]
)  # ragged last block, W = 1, W > T, one block; MHA and GQA 3
def test_blocked_soft_attention_matches_reference_with_grads(t, window, block, group):
    q, k, v, g, pos = qkv(t=t, g=group, seed=t)
    ref = functools.partial(soft_gated_attention_reference, window=window)
    blk = functools.partial(soft_gated_attention, window=window, block=block)
    np.testing.assert_allclose(blk(q, k, v, g, pos), ref(q, k, v, g, pos), atol=1e-5)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a, pos) * w), argnums=(0, 1, 2, 3))(q, k, v, g)

    for a, b in zip(grads(blk), grads(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_gate_one_is_exact_causal_attention():
    q, k, v, _, pos = qkv()
    ones = jnp.ones((q.shape[0], q.shape[2], q.shape[1]))
    want = masked_attention(q, k, v, causal_mask(pos, pos))
    np.testing.assert_allclose(soft_gated_attention(q, k, v, ones, pos, window=4, block=8), want, atol=1e-6)


def test_window_covering_sequence_makes_gate_irrelevant():
    q, k, v, g, pos = qkv(t=20)
    a = soft_gated_attention(q, k, v, g, pos, window=20, block=8)
    b = soft_gated_attention(q, k, v, g * 0.01, pos, window=20, block=8)
    np.testing.assert_array_equal(a, b)


def test_gate_at_epsilon_approaches_window_attention():
    q, k, v, _, pos = qkv(t=30)
    window = 6
    tiny = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]))
    dist = pos[:, :, None] - pos[:, None, :]
    want = masked_attention(q, k, v, (dist >= 0) & (dist < window))
    got = soft_gated_attention(q, k, v, tiny, pos, window=window, eps=1e-12, block=8)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the default eps = 1e-3 leaves a small, not a zero, weight beyond the window
    loose = soft_gated_attention(q, k, v, tiny, pos, window=window, block=8)
    assert 1e-5 < float(jnp.abs(loose - want).max()) < 0.2


def test_bias_is_shared_by_the_query_heads_of_a_group():
    """Each query head of a group equals a G = 1 call with that head alone: the bias depends on the
    key and its KV head only."""
    q, k, v, g, pos = qkv(g=3)
    full = soft_gated_attention_reference(q, k, v, g, pos, window=5)
    for gi in range(3):
        one = soft_gated_attention_reference(q[:, :, :, gi : gi + 1], k, v, g, pos, window=5)
        np.testing.assert_allclose(full[:, :, :, gi : gi + 1], one, atol=1e-6)


# ----------------------------------------------------------------------------- objective


def test_sparsity_loss_closed_forms_and_zero_gradient_in_last_window():
    t, window = 40, 8
    c = 0.3
    g = jnp.full((2, 1, 2, t), c)
    offset, scale = sparsity_weights(t, window)
    np.testing.assert_allclose(sparsity_loss(g, window), jnp.mean(offset + scale * (2 * c - c * c)), rtol=1e-6)
    np.testing.assert_allclose(sparsity_loss(jnp.ones_like(g), window), 1.0, rtol=1e-6)  # g = 1: full cost
    np.testing.assert_allclose(sparsity_loss(g[..., :window], window), 1.0, rtol=1e-6)  # T <= W: all local
    grad = jax.grad(lambda x: sparsity_loss(x, window))(g)
    assert bool(jnp.all(grad[..., t - window :] == 0))
    assert bool(jnp.all(grad[..., : t - window] > 0))
    # early keys carry (almost) the full 2 - 2g slope, scaled by 1 / (L B K T)
    np.testing.assert_allclose(grad[0, 0, 0, 0] * g.size, (1 - window / t) * (2 - 2 * c), rtol=1e-5)


def _always_open_gate_params(gate, cfg, key):
    """Gate params with w2 = 0 and b2 = 40: sigmoid(40) rounds to exactly 1.0 in float32."""
    p = gates.init_stacked(gate, cfg, key)
    return dict(p, w2=jnp.zeros_like(p["w2"]), b2=jnp.full_like(p["b2"], 40.0))


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_QWEN3], ids=lambda c: c.arch)
def test_student_with_open_gates_is_the_teacher(cfg):
    params = init_params(cfg, jax.random.PRNGKey(0))
    gate = gates.make("wgkv", cfg)
    gp = _always_open_gate_params(gate, cfg, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    teacher, _ = hidden_states(params, cfg, tokens, pos)
    student, g = student_hidden(params, gp, cfg, SoftGateAttend(gate, window=4, block=8), tokens)
    assert bool(jnp.all(g == 1.0))
    np.testing.assert_allclose(student, teacher, atol=1e-5)


def test_training_steps_reduce_loss_and_touch_only_gates():
    cfg = TINY_LLAMA
    params = init_params(cfg, jax.random.PRNGKey(0))
    gate = gates.make("wgkv", cfg)
    gp = gates.init_stacked(gate, cfg, jax.random.PRNGKey(1))
    attend = SoftGateAttend(gate, window=4, block=16)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 32), 0, cfg.vocab_size)
    teacher, _ = hidden_states(params, cfg, tokens, jnp.broadcast_to(jnp.arange(32), (2, 32)))
    opt = optax.adamw(1e-2, weight_decay=0.01)
    state = opt.init(gp)
    loss_fn = jax.jit(lambda gp: wgkv_loss(gp, params, cfg, attend, tokens, teacher, 1.0))
    grad_fn = jax.jit(jax.grad(lambda gp: wgkv_loss(gp, params, cfg, attend, tokens, teacher, 1.0)[0]))
    first, parts = loss_fn(gp)
    assert set(parts) == {"distill", "sparsity", "g_mean", "admit"}
    for _ in range(15):
        updates, state = opt.update(grad_fn(gp), state, gp)
        gp = optax.apply_updates(gp, updates)
    last, _ = loss_fn(gp)
    assert float(last) < float(first)
    ref_attend = SoftGateAttend(gate, window=4, reference=True)
    np.testing.assert_allclose(wgkv_loss(gp, params, cfg, ref_attend, tokens, teacher, 1.0)[0], last, rtol=1e-5)
