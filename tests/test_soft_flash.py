"""The Pallas soft-gated flash-attention kernels (interpret mode on CPU) against the dense float32
reference: outputs and the gradients in q, k, v and the gates."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wgkv_jax.attention.reference import causal_mask, masked_attention
from wgkv_jax.attention.soft_gate import DEFAULT_EPS, soft_gated_attention_reference
from wgkv_jax.kernels import soft_flash
from wgkv_jax.kernels.ragged import Tiling

TINY = soft_flash.FlashTiling(  # different blocks per kernel, so the three loop structures differ
    forward=Tiling(block_m=32, block_k=16), dkv=Tiling(block_m=16, block_k=32), dq=Tiling(block_m=16, block_k=16)
)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# interpret-mode kernels are cheap to run but slow to compile: skip LLVM's optimisations (same results)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit_run(fn, *args, **static):
    """fn(*args, **static), jitted with `static` as static arguments and compiled with FAST_COMPILE."""
    return jax.jit(functools.partial(fn, **static)).lower(*args).compile(FAST_COMPILE)(*args)


def _case(seed, b, t, k, g, e, dtype, *, gate="spread", gaps=False):
    """Random inputs (numpy: eager jax.random would compile per shape); positions arange(T) + 7 b
    (gaps: random steps of 0 to 3, so some positions repeat); gates log-uniform in [2 eps, 1]
    ("spread") or 1."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)  # noqa: E731
    q, kk, v = normal(b, t, k, g, e), normal(b, t, k, e), normal(b, t, k, e)
    if gate == "ones":
        gt = np.ones((b, k, t), np.float32)
    else:
        gt = np.exp(rng.uniform(np.log(2 * DEFAULT_EPS), 0.0, (b, k, t))).astype(np.float32)
    pos = np.arange(t)[None, :] + 7 * np.arange(b)[:, None]
    if gaps:
        pos = np.cumsum(rng.integers(0, 4, (b, t)), axis=1) + 7 * np.arange(b)[:, None]
    return q, kk, v, jnp.asarray(gt), jnp.asarray(pos, jnp.int32), normal(b, t, k, g, e)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _kernel_vjp(q, k, v, gt, pos, ct, *, window, tiling=TINY):
    f = lambda *x: soft_flash.soft_flash_attention(*x, pos, window=window, tiling=tiling, interpret=True)  # noqa: E731
    out, vjp = jax.vjp(f, q, k, v, gt)
    return out, vjp(ct)


def _reference_vjp(q, k, v, gt, pos, ct, *, window):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    f = lambda *x: soft_gated_attention_reference(*x, pos, window=window)  # noqa: E731
    out, vjp = jax.vjp(f, f32(q), f32(k), f32(v), f32(gt))
    return out, vjp(f32(ct))


@pytest.mark.parametrize(
    "b, t, k, g, e, dtype, window, gate, tiling, gaps",
    [
        (2, 60, 2, 1, 64, jnp.float32, 18, "spread", TINY, False),  # MHA, T not a block multiple, window < T
        (2, 50, 1, 3, 64, jnp.float32, 6, "ones", TINY, False),  # GQA 3, unit gates: plain causal attention
        (1, 37, 2, 4, 128, jnp.float32, 100, "spread", TINY, False),  # GQA 4, head_dim 128, window > T
        (2, 45, 2, 3, 64, jnp.bfloat16, 45, "spread", TINY, False),  # bf16, window == T
        (2, 64, 1, 4, 64, jnp.bfloat16, 16, "spread", None, False),  # bf16, default tiling (fitted), T = block
        (2, 70, 1, 2, 32, jnp.float32, 20, "spread", TINY, True),  # positions with gaps and repeats
    ],
)
def test_matches_reference(b, t, k, g, e, dtype, window, gate, tiling, gaps):
    q, kk, v, gt, pos, ct = _case(b * t + g * e, b, t, k, g, e, dtype, gate=gate, gaps=gaps)
    out, grads = _jit_run(_kernel_vjp, q, kk, v, gt, pos, ct, window=window, tiling=tiling)
    ref, ref_grads = _jit_run(_reference_vjp, q, kk, v, gt, pos, ct, window=window)
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL[dtype]
    assert _rel(out, ref) < tol
    for name, x, y, want in zip("qkvg", grads, ref_grads, (q, kk, v, gt), strict=True):
        assert x.dtype == want.dtype and x.shape == want.shape, name
        assert _rel(x, y) < tol, (name, _rel(x, y))
    if gate == "ones":  # unit gates: exactly causal attention, whatever the window
        assert _rel(out, _jit_run(_causal, q, kk, v, pos)) < tol
    if window >= t:  # every pair is inside the window: the gates have no effect
        assert float(jnp.max(jnp.abs(grads[3]))) == 0.0
    else:
        assert float(jnp.max(jnp.abs(ref_grads[3]))) > 0.0


def _causal(q, k, v, pos):
    return masked_attention(q, k, v, causal_mask(pos, pos))


def test_gates_at_or_below_eps_get_zero_gradient():
    """Gates clamped to eps get no gradient (jax.grad of a scalar loss, jitted); the others match."""
    t, window = 40, 6
    q, kk, v, gt, pos, ct = _case(2, 1, t, 2, 2, 64, jnp.float32)
    low = (jnp.arange(t) % 3 == 0)[None, None] & jnp.ones_like(gt, bool)
    clamped = jnp.array([1e-6, 0.5 * DEFAULT_EPS, 0.0])[jnp.arange(t) // 3 % 3]
    gt = jnp.where(low, clamped[None, None], gt)

    def loss(fn, *x):
        return jnp.sum(fn(*x, pos, window=window) * ct)

    kernel = functools.partial(soft_flash.soft_flash_attention, tiling=TINY, interpret=True)
    dg = _jit_run(jax.grad(lambda *x: loss(kernel, *x), argnums=3), q, kk, v, gt)
    want = _jit_run(jax.grad(lambda *x: loss(soft_gated_attention_reference, *x), argnums=3), q, kk, v, gt)
    dg, low = np.asarray(dg), np.asarray(low)
    assert np.all(dg[low] == 0.0)
    assert np.all(dg[:, :, :-window][~low[:, :, :-window]] != 0.0)  # every other key seen beyond the window moves
    assert _rel(dg, want) < 2e-5


def test_unsupported_names_the_reason():
    q, kk, v, gt, pos, _ = _case(4, 1, 16, 1, 2, 48, jnp.float32)
    assert soft_flash.unsupported(q, kk, v) == "head_dim 48 is not a power of two >= 16"
    with pytest.raises(ValueError, match="head_dim 48"):
        soft_flash.soft_flash_attention(q, kk, v, gt, pos, window=4, interpret=True)
    q8 = jnp.zeros((1, 16, 1, 2, 8))
    assert "head_dim 8" in soft_flash.unsupported(q8, q8[:, :, :, 0], q8[:, :, :, 0])
    q64 = jnp.zeros((1, 16, 1, 2, 64))
    assert soft_flash.unsupported(q64, q64[:, :, :, 0], q64[:, :, :, 0]) is None
    split = soft_flash.FlashTiling(dq=Tiling(splits=2))
    assert "splits" in soft_flash.unsupported(q64, q64[:, :, :, 0], q64[:, :, :, 0], split)


def test_training_loss_and_gate_gradients_through_the_kernels():
    """The gate-training objective through SoftGateAttend(impl="interpret") == the blocked XLA path:
    loss and the gradients of every gate parameter (tiny Llama, 2 layers, GQA 2)."""
    from conftest import TINY_LLAMA

    from wgkv_jax import gates
    from wgkv_jax.model import init_params
    from wgkv_jax.model.transformer import hidden_states
    from wgkv_jax.train import SoftGateAttend
    from wgkv_jax.train.objective import wgkv_loss

    cfg = TINY_LLAMA
    params = init_params(cfg, jax.random.PRNGKey(0))
    gate = gates.make("wgkv", cfg)
    gp = gates.init_stacked(gate, cfg, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 40)), jnp.int32)
    teacher, _ = hidden_states(params, cfg, tokens, jnp.arange(40)[None])

    def loss(attend):
        return jax.value_and_grad(lambda gp: wgkv_loss(gp, params, cfg, attend, tokens, teacher, 1.0)[0])(gp)

    want, want_g = loss(SoftGateAttend(gate, window=8, block=16))
    got, got_g = loss(SoftGateAttend(gate, window=8, impl="interpret"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)
