"""Training steps: data-parallel == single device, admission-rate metric, loss goes down."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY_LLAMA

import wgkv_jax
from wgkv_jax import gates, sharding
from wgkv_jax.model import init_params, param_logical_axes
from wgkv_jax.train import SoftGateAttend
from wgkv_jax.train.objective import admission_rate
from wgkv_jax.train.step import eval_step, make_optimizer, train_step

CFG = TINY_LLAMA
GATE = gates.make("wgkv", CFG)
ATTEND = SoftGateAttend(GATE, window=8, block=16)


def setup(seed=0):
    params = init_params(CFG, jax.random.PRNGKey(seed))
    gp = gates.init_stacked(GATE, CFG, jax.random.PRNGKey(seed + 1))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 2), (8, 32), 0, CFG.vocab_size)
    return params, gp, tokens


def test_admission_rate_counts_only_keys_beyond_the_window():
    g = jnp.zeros((1, 1, 1, 10)).at[..., :3].set(0.5).at[..., 8:].set(0.9)  # last 2 keys stay local (W=2)
    assert float(admission_rate(g, window=2, tau=0.1)) == 3 / 8
    assert float(admission_rate(g, window=2, tau=0.6)) == 0.0


def test_data_parallel_step_equals_single_device():
    params, gp, tokens = setup()
    opt = make_optimizer(1e-2, 0.01, steps=10, warmup_frac=0.1)
    kw = dict(cfg=CFG, attend=ATTEND, optimizer=opt, lam=0.5, tau=0.1)
    gp1, _, m1 = train_step(jax.tree.map(jnp.copy, gp), opt.init(gp), params, tokens, **kw)

    mesh = wgkv_jax.make_mesh(data=8, model=1)
    params_s = sharding.shard_tree(jax.tree.map(np.asarray, params), param_logical_axes(CFG), mesh)
    tokens_s = jax.device_put(tokens, sharding.logical_sharding(("batch", "seq"), tokens.shape, mesh))
    gp_s = jax.device_put(jax.tree.map(np.asarray, gp), sharding.replicated(mesh))
    assert len(tokens_s.sharding.device_set) == 8
    gp8, _, m8 = train_step(gp_s, opt.init(gp_s), params_s, tokens_s, **kw)
    for k in ("loss", "distill", "sparsity", "admit"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(gp8), jax.tree.leaves(gp1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_steps_lower_the_loss_and_only_gates_change():
    params, gp, tokens = setup(3)
    before = jax.tree.map(np.asarray, params)
    opt = make_optimizer(1e-2, 0.01, steps=20, warmup_frac=0.1)
    kw = dict(cfg=CFG, attend=ATTEND, lam=1.0, tau=0.1)
    first = eval_step(gp, params, tokens, **kw)["loss"]
    state = opt.init(gp)
    for _ in range(20):
        gp, state, metrics = train_step(gp, state, params, tokens, optimizer=opt, **kw)
    assert np.isfinite(metrics["grad_norm"])
    assert float(eval_step(gp, params, tokens, **kw)["loss"]) < float(first)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
