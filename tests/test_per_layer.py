"""Capacity per layer: with unrolled layers, an eviction policy's ragged budget leaves each layer a
store of its own size (`PerLayerCache`), and everything else is unchanged."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import TINY_LLAMA

import wgkv_jax
from wgkv_jax import policies as P
from wgkv_jax.cache import CacheConfig, FixedAdmission
from wgkv_jax.cache.per_layer import PerLayerAttend, PerLayerCache
from wgkv_jax.infer.generate import generate_ids
from wgkv_jax.model import init_params
from wgkv_jax.model.transformer import hidden_states, unstack_tree

CFG = TINY_LLAMA


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.PRNGKey(0))
    return dict(p, lm_head=p["lm_head"] * 30)  # decisive argmax: greedy tokens compare exactly


def unrolled(params):
    return dict(params, layers=unstack_tree(params["layers"], CFG.n_layers))


def run(params, prompts, policy, **kw):
    cache = CacheConfig(window=16, chunk=64)
    return generate_ids(
        params, CFG, prompts, max_new_tokens=6, cache=cache, admission=FixedAdmission("random", 0.7, seed=3),
        policy=policy, return_cache=True, **kw,
    )  # fmt: skip


def test_ragged_budget_gets_a_capacity_per_layer_with_identical_tokens(params):
    prompts = [np.random.default_rng(s).integers(0, CFG.vocab_size, n).tolist() for s, n in ((1, 120), (2, 77))]
    policy = P.get("h2o", budget=P.Global(P.KeepRatio(0.2)), recent=4)
    want, _, stacked = run(params, prompts, policy)
    got, _, split = run(unrolled(params), prompts, policy)
    assert got == want
    per, whole = split["cache_state"], stacked["cache_state"]
    assert isinstance(per, PerLayerCache) and split["capacities"] == per.capacities
    held_l = np.asarray(whole.length).max(axis=(1, 2))  # kept after the prompt + admitted by decode
    assert all(held <= c for held, c in zip(held_l, per.capacities, strict=True))
    assert int(np.asarray(per.evicted).sum()) == int(np.asarray(whole.evicted).sum()) == 0
    assert max(per.capacities) == whole.capacity and len(set(per.capacities)) > 1  # the budget is ragged
    assert per.kv_nbytes < whole.kv_nbytes
    np.testing.assert_array_equal(np.asarray(per.length), np.asarray(whole.length))
    s, t = split["cache"], stacked["cache"]
    assert (s.stored_entries, s.kv_ratio, s.policy_evicted) == (t.stored_entries, t.kv_ratio, t.policy_evicted)
    assert s.allocated_bytes < t.allocated_bytes


def test_a_context_with_a_capacity_per_layer_serves_prompts(params):
    ctx_ids = np.random.default_rng(5).integers(0, CFG.vocab_size, 90).tolist()
    policy = P.get("snapkv", budget=P.PerLayer(P.KeepRatio(0.5)), window=8)
    models = [wgkv_jax.Model(config=CFG, params=p) for p in (params, unrolled(params))]
    outs = []
    for model in models:
        ctx = wgkv_jax.prefill_context(model, ctx_ids, gate="random:0.7", cache=CacheConfig(window=16), policy=policy)
        outs.append([wgkv_jax.generate(model, [q], context=ctx, max_new_tokens=4).tokens for q in ([3, 4], [9])])
        outs.append(wgkv_jax.context_logprobs(model, ctx, [7, 8, 9, 10]))
    assert isinstance(ctx.state, PerLayerCache)
    assert outs[0] == outs[2]
    np.testing.assert_allclose(outs[1], outs[3], atol=1e-5)


def test_scanned_layers_cannot_run_a_capacity_per_layer(params):
    _, _, split = run(unrolled(params), [[1, 2, 3] * 20], P.get("h2o", budget=P.Global(P.KeepRatio(0.5))))
    attend = PerLayerAttend(wgkv_jax.cache.DualAttend(FixedAdmission("all")))
    tokens, pos = np.zeros((1, 1), np.int32), np.full((1, 1), 60, np.int32)
    with pytest.raises(TypeError, match="layers='unrolled'"):
        hidden_states(params, CFG, tokens, pos, attend=attend, state=split["cache_state"])
