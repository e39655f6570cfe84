"""The dual cache with the trained SmolLM2 gate on real text (slow: real model)."""

from __future__ import annotations

import pytest

import wgkv_jax
from wgkv_jax.eval import make_needle_case


@pytest.mark.slow
def test_short_prompts_match_full_cache(smollm2):
    """Prompts shorter than the window never reach the gate: output identical to a full cache."""
    prompts = ["What is the capital of France?", "Name three primary colors."]
    full = wgkv_jax.generate(smollm2, prompts, max_new_tokens=24)
    dual = wgkv_jax.generate(smollm2, prompts, max_new_tokens=24, cache=wgkv_jax.CacheConfig())
    assert dual.tokens == full.tokens
    assert "Paris" in dual.texts[0]
    assert dual.cache_stats.kind == "dual" and dual.cache_stats.evicted == 0


@pytest.mark.slow
def test_needle_in_3k_haystack_with_half_the_cache(smollm2):
    case = make_needle_case(smollm2.tokenizer, 3000, depth=0.4, seed=7)
    out = wgkv_jax.generate(smollm2, case.prompt, max_new_tokens=8, chat=False, cache=wgkv_jax.CacheConfig())
    n_prompt = len(out.prompt_tokens[0])
    assert 2900 < n_prompt < 3200
    assert case.answer in out.texts[0], out.texts[0]
    stats = out.cache_stats
    assert stats.stored_fraction <= 0.5, stats.summary()
    assert stats.allocated_bytes < stats.full_cache_bytes
