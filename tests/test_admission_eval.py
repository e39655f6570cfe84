"""Hard-admission evaluation: full == the plain model, local == window attention, KV ratio."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY_QWEN3

from wgkv_jax import gates
from wgkv_jax.model import forward, init_params
from wgkv_jax.train.evaluate import AdmissionAttend, admission_nll, kv_ratio
from wgkv_jax.train.objective import admission_rate

CFG = TINY_QWEN3
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, CFG.vocab_size)


def plain_nll(params, tokens):
    logp = jax.nn.log_softmax(forward(params, CFG, tokens)[:, :-1], -1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def test_full_admission_is_the_plain_model():
    nll, n, admit = admission_nll(PARAMS, None, TOKENS, cfg=CFG, attend=AdmissionAttend("full", window=8, block=16))
    np.testing.assert_allclose(nll, plain_nll(PARAMS, TOKENS), rtol=1e-5)
    assert n == 2 * 39 and bool(jnp.all(admit))
    assert float(kv_ratio(admit, 8)) == 1.0


def test_local_and_window_covering_sequence():
    local = AdmissionAttend("local", window=8, block=16)
    nll_local, _, admit = admission_nll(PARAMS, None, TOKENS, cfg=CFG, attend=local)
    assert not bool(jnp.any(admit))
    np.testing.assert_allclose(float(kv_ratio(admit, 8)), 8 / 40)
    assert abs(float(nll_local) - float(plain_nll(PARAMS, TOKENS))) > 1e-3  # dropping keys changes outputs
    wide = AdmissionAttend("local", window=40, block=16)  # W >= T: nothing is ever dropped
    np.testing.assert_allclose(
        admission_nll(PARAMS, None, TOKENS, cfg=CFG, attend=wide)[0], plain_nll(PARAMS, TOKENS), rtol=1e-5
    )


def test_random_rate_and_open_gate():
    rand = AdmissionAttend("random", window=8, rate=0.3, seed=1, block=16)
    _, _, admit = admission_nll(PARAMS, None, TOKENS, cfg=CFG, attend=rand)
    rate = float(admission_rate(admit.astype(jnp.float32), 8, 0.5))
    assert 0.15 < rate < 0.45
    np.testing.assert_allclose(
        float(kv_ratio(admit, 8)), float(jnp.mean((8 + jnp.sum(admit[..., :32], -1)) / 40)), rtol=1e-6
    )
    gate = gates.make("wgkv", CFG)
    gp = gates.init_stacked(gate, CFG, jax.random.PRNGKey(2))
    gp = dict(gp, w2=jnp.zeros_like(gp["w2"]), b2=jnp.full_like(gp["b2"], 40.0))  # g == 1
    nll, _, admit = admission_nll(PARAMS, gp, TOKENS, cfg=CFG, attend=AdmissionAttend("gate", 8, gate, block=16))
    assert bool(jnp.all(admit))
    np.testing.assert_allclose(nll, plain_nll(PARAMS, TOKENS), rtol=1e-5)
