"""KVzip's context-independent head-level mode: calibration, the exact head count, whole heads kept
or dropped in generation, and real memory with a capacity per layer."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import TINY_LLAMA

from wgkv_jax import policies as P
from wgkv_jax.cache import CacheConfig, FixedAdmission, PerLayerCache
from wgkv_jax.cache import evict as E
from wgkv_jax.eval.harness import EvalConfig
from wgkv_jax.infer.generate import generate_ids
from wgkv_jax.model import init_params
from wgkv_jax.model.transformer import unstack_tree

CFG = dataclasses.replace(TINY_LLAMA, n_layers=3)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(2))


def text(n, seed):
    return np.random.default_rng(seed).integers(1, CFG.vocab_size, n).tolist()


def test_kept_heads_count_ties_and_errors():
    pol = P.get("kvzip_heads", keep_ratio=0.5, head_scores=[[0.9, 0.1], [0.5, 0.5], [0.2, 0.95]])
    assert pol.ratio == 0.5 and pol.budget == P.Threshold(0.5)
    np.testing.assert_array_equal(pol.kept_heads(), [[True, False], [True, False], [False, True]])  # tie: (1, 0)
    assert P.KVzipHeads(head_scores=((0.1,),), ratio=0.01).kept_heads().sum() == 1  # never empty
    with pytest.raises(ValueError, match="non-empty"):
        P.KVzipHeads(head_scores=((0.1, 0.2), (0.3,)))
    with pytest.raises(ValueError, match=r"ratio=1\.5"):
        P.KVzipHeads(head_scores=((0.1,),), ratio=1.5)
    with pytest.raises(ValueError, match=r"ratio= \(a fraction of the heads"):
        P.KVzipHeads(head_scores=((0.1,),), budget=P.Global(P.Tokens(3)))
    with pytest.raises(ValueError, match="no per-entry score"):
        pol.score(pos=None, valid=None)
    with pytest.raises(ValueError, match="2 KV heads; this cache has 4 x 2"):
        pol.store_scores(np.ones((4, 1, 2, 8), bool))
    with pytest.raises(ValueError, match="head scores"):
        EvalConfig(methods=("kvzip_heads",))


def test_calibration_scores_are_max_pooled_probabilities(params):
    kw = dict(first_ids=[5, 6, 7], next_ids=[8, 9], window=16, chunk=64)
    a, b = (E.kvzip_head_scores(params, CFG, [text(n, s)], **kw) for n, s in ((60, 1), (45, 2)))
    both = E.kvzip_head_scores(params, CFG, [text(60, 1), text(45, 2)], **kw)
    assert both.shape == (CFG.n_layers, CFG.n_kv_heads) and np.all((both > 0) & (both <= 1))
    np.testing.assert_allclose(both, np.maximum(a, b), rtol=1e-6)


def test_generation_keeps_or_drops_whole_heads(params):
    scores = [[0.9, 0.8], [0.1, 0.2], [0.7, 0.3]]  # ratio 0.5: heads (0,0), (0,1), (2,0)
    policy = P.KVzipHeads(head_scores=scores, ratio=0.5)
    prompts = [text(70, 3), text(50, 4)]
    cache = CacheConfig(window=16, chunk=64, capacity_fraction=1.0)  # the plain run keeps everything too
    kw = dict(max_new_tokens=1, cache=cache, admission=FixedAdmission("all"), return_cache=True)
    _, _, plain = generate_ids(params, CFG, prompts, **kw)
    _, _, kept = generate_ids(params, CFG, prompts, policy=policy, room=0, **kw)
    keep_lk = policy.kept_heads()
    want = np.where(keep_lk[:, None, :], np.asarray(plain["cache_state"].length), 0)
    np.testing.assert_array_equal(np.asarray(kept["cache_state"].length), want)
    assert kept["cache"].policy_evicted == int(np.asarray(plain["cache_state"].length).sum() - want.sum())
    # unrolled layers: layer 1 dropped both heads, so its store shrinks to the minimum
    unrolled = dict(params, layers=unstack_tree(params["layers"], CFG.n_layers))
    _, _, split = generate_ids(unrolled, CFG, prompts, policy=policy, room=0, **kw)
    state = split["cache_state"]
    assert isinstance(state, PerLayerCache) and state.capacities[1] == 16 < state.capacities[0]
    np.testing.assert_array_equal(np.asarray(state.length), want)
    with pytest.raises(ValueError, match="only eviction stage"):
        generate_ids(params, CFG, prompts, policy=P.Chain([P.Protect(sinks=2), policy]), **kw)
