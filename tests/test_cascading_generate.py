"""Cascading through the user surface: the policy registry, `generate`, cache stats, the harness
and the CLI's settings checks (the cache itself is tested in test_cascading.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import TINY_LLAMA

import wgkv_jax
from wgkv_jax import policies
from wgkv_jax.cache.cascading import CascadeConfig
from wgkv_jax.eval.harness import EvalConfig
from wgkv_jax.model import init_params


def test_registry_sizes_the_cache_from_the_prompt():
    pol = policies.get("cascading", keep_ratio=0.25, cascades=3, sinks=2)
    assert "cascading" in policies.available()
    assert pol.cache_config(1000) == CascadeConfig(window=(250 - 2) // 3, cascades=3, sinks=2)
    assert policies.Cascading(budget=policies.Tokens(100)).cache_config(10_000).capacity == 100
    assert policies.get("cascading", keep_ratio=0.01).cache_config(2048) == CascadeConfig(window=4)  # 20 slots
    with pytest.raises(ValueError, match="must be KeepRatio, Tokens or PerHead"):
        policies.Cascading(budget=policies.Global(policies.KeepRatio(0.5)))
    with pytest.raises(ValueError, match="cascades=0"):
        policies.get("cascading", keep_ratio=0.5, cascades=0)
    with pytest.raises(ValueError, match="positions='rope'"):
        policies.get("cascading", keep_ratio=0.5, positions="rope")
    with pytest.raises(ValueError, match="need tokens >= 8"):
        policies.get("cascading", tokens=6).cache_config(100)


def test_generate_with_a_covering_budget_equals_the_full_cache_and_a_small_one_saves_memory():
    cfg = TINY_LLAMA
    model = wgkv_jax.Model(config=cfg, params=init_params(cfg, jax.random.PRNGKey(3)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (70, 41)]
    full = wgkv_jax.generate(model, prompts, max_new_tokens=6)
    big = policies.Cascading(budget=policies.Tokens(4 + 4 * 20))  # 84 slots >= 70 + 6 tokens
    out = wgkv_jax.generate(model, prompts, max_new_tokens=6, policy=big)
    assert out.tokens == full.tokens
    s = out.cache_stats
    assert s.kind == "cascading" and s.kv_ratio == pytest.approx(1.0) and s.stored_entries == s.full_entries

    small = wgkv_jax.generate(model, prompts, max_new_tokens=6, policy="cascading", keep_ratio=0.5)
    s = small.cache_stats
    ccfg = policies.get("cascading", keep_ratio=0.5).cache_config(70)
    layers_heads = cfg.n_layers * cfg.n_kv_heads
    assert s.capacity == ccfg.capacity == 4 + 4 * 7
    assert s.stored_entries == layers_heads * 2 * ccfg.capacity  # both rows outgrew the cache: it is full
    assert s.allocated_bytes < full.cache_stats.allocated_bytes and s.kv_ratio < 1.0
    with pytest.raises(ValueError, match="takes no gate or CacheConfig"):
        wgkv_jax.generate(model, prompts, policy="cascading", keep_ratio=0.5, cache=wgkv_jax.CacheConfig())


def test_a_cascading_context_serves_prompts_and_scores_continuations():
    """prefill_context(policy=Cascading): continuing it == the full cache on context + prompt
    (while the cache holds everything), it stays intact, and context_logprobs == the dense forward."""
    cfg = TINY_LLAMA
    model = wgkv_jax.Model(config=cfg, params=init_params(cfg, jax.random.PRNGKey(4)))
    rng = np.random.default_rng(1)
    ctx_ids, q_ids = rng.integers(1, cfg.vocab_size, 50).tolist(), rng.integers(1, cfg.vocab_size, 9).tolist()
    ctx = wgkv_jax.prefill_context(model, ctx_ids, policy=policies.Cascading(budget=policies.Tokens(100)))
    assert ctx.cascade.capacity == 100 and ctx.stats.kind == "cascading" and ctx.length == 50
    before = jax.tree.map(np.asarray, ctx.state)
    full = wgkv_jax.generate(model, [ctx_ids + q_ids], max_new_tokens=5)
    for _ in range(2):  # the context is reused unchanged
        out = wgkv_jax.generate(model, [q_ids], context=ctx, max_new_tokens=5)
        assert out.tokens == full.tokens
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(ctx.state), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    logp = wgkv_jax.context_logprobs(model, ctx, q_ids)
    dense = np.asarray(jax.nn.log_softmax(model.logits(np.asarray([ctx_ids + q_ids], np.int32))[0], axis=-1))
    want = dense[np.arange(50, 58), np.asarray(q_ids[1:])]
    np.testing.assert_allclose(logp, want, atol=1e-4)


def test_harness_accepts_cascading_but_not_with_the_gate():
    cfg = EvalConfig(tasks=("niah", "ppl"), lengths=(512,), methods=("full", "cascading"), keep_ratios=(0.25,))
    assert cfg.cells() == [
        ("niah", 512, "full", None), ("niah", 512, "cascading", 0.25),
        ("ppl", 512, "full", None), ("ppl", 512, "cascading", 0.25),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="does not compose with the gate"):
        EvalConfig(methods=("wgkv+cascading",))
