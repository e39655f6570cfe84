"""Model properties on tiny random models: attention == reference, causality, cache equivalence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA, TINY_QWEN2, TINY_QWEN3

from wgkv_jax.attention import blocked_causal_attention, causal_mask, masked_attention
from wgkv_jax.cache.full import KVCache, decode_attend, prefill_attend
from wgkv_jax.model import ModelConfig, RopeScaling, forward, hidden_states, init_params, lm_head, rope_inv_freq

CONFIGS = [TINY_LLAMA, TINY_QWEN2, TINY_QWEN3]


@pytest.mark.parametrize("t,block", [(1, 4), (7, 4), (16, 4), (33, 8), (64, 256)])
@pytest.mark.parametrize("group", [1, 3])
def test_blocked_attention_matches_reference(t, block, group):
    rng = np.random.default_rng(t * 10 + group)
    b, k, d = 2, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, k, group, d)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, t, k, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, k, d)), jnp.float32)
    # ragged rows: row 1 starts at an offset (positions need not start at 0)
    pos = jnp.stack([jnp.arange(t), jnp.arange(t) + 5]).astype(jnp.int32)
    want = masked_attention(q, kk, v, causal_mask(pos, pos))
    got = blocked_causal_attention(q, kk, v, pos, block=block)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.arch)
def test_causality(cfg):
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 0, cfg.vocab_size)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % cfg.vocab_size)
    a, b = forward(params, cfg, tokens), forward(params, cfg, changed)
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-4


LENGTHS, TOTAL = (5, 11), 16


def prefill_and_decode_against_forward(params, cfg, cache, seed: int = 3):
    """Prefill two right-padded rows of LENGTHS into `cache`, then decode each row one token at a
    time at its own position up to TOTAL, checking every logit against one full forward per row.
    Returns the final cache."""
    seqs = np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (2, TOTAL), 0, cfg.vocab_size), np.int32)
    t_pad = 12
    tokens = np.zeros((2, t_pad), np.int32)
    for r, n in enumerate(LENGTHS):
        tokens[r, :n] = seqs[r, :n]
    pos = jnp.broadcast_to(jnp.arange(t_pad, dtype=jnp.int32), (2, t_pad))
    h, cache = hidden_states(params, cfg, jnp.asarray(tokens), pos, attend=prefill_attend, state=cache)
    full = [forward(params, cfg, jnp.asarray(seqs[r : r + 1])) for r in range(2)]
    pre = lm_head(params, cfg, h)
    for r, n in enumerate(LENGTHS):
        np.testing.assert_allclose(pre[r, :n], full[r][0, :n], atol=2e-5)
    for step in range(TOTAL - max(LENGTHS)):
        pos_b = jnp.asarray([n + step for n in LENGTHS], jnp.int32)
        tok_b = jnp.asarray([seqs[r, n + step] for r, n in enumerate(LENGTHS)], jnp.int32)
        h, cache = hidden_states(params, cfg, tok_b[:, None], pos_b[:, None], attend=decode_attend, state=cache)
        out = lm_head(params, cfg, h)[:, 0]
        for r, n in enumerate(LENGTHS):
            np.testing.assert_allclose(out[r], full[r][0, n + step], atol=2e-5)
    return cache


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.arch)
def test_prefill_then_decode_equals_full_forward(cfg):
    """Cache equivalence: prefill(prompt) + one-token decode steps == one full forward, per row,
    with rows of different lengths right-padded in one batch."""
    prefill_and_decode_against_forward(init_params(cfg, jax.random.PRNGKey(2)), cfg, KVCache.zeros(cfg, 2, 32))


def test_llama3_rope_scaling_bands():
    base = ModelConfig(head_dim=64, rope_theta=500000.0)
    scaled = ModelConfig(
        head_dim=64, rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0, original_max_position=8192)
    )
    inv, inv_s = rope_inv_freq(base), rope_inv_freq(scaled)
    wavelen = 2 * np.pi / inv
    hi = wavelen < 8192 / 4.0  # high frequencies: untouched
    lo = wavelen > 8192 / 1.0  # low frequencies: divided by the factor
    np.testing.assert_allclose(inv_s[hi], inv[hi])
    np.testing.assert_allclose(inv_s[lo], inv[lo] / 8.0)
    mid = ~hi & ~lo
    assert np.all((inv_s[mid] < inv[mid]) & (inv_s[mid] > inv[mid] / 8.0))


def test_rope_freq_factors_override():
    cfg = ModelConfig(head_dim=8, rope_freq_factors=(1.0, 2.0, 4.0, 8.0))
    np.testing.assert_allclose(rope_inv_freq(cfg), rope_inv_freq(ModelConfig(head_dim=8)) / [1, 2, 4, 8])
    with pytest.raises(ValueError, match="rope_freq_factors has 2 entries, expected 4"):
        rope_inv_freq(ModelConfig(head_dim=8, rope_freq_factors=(1.0, 2.0)))


def test_config_errors():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelConfig(arch="gpt2")
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        ModelConfig(n_heads=6, n_kv_heads=4)
