"""The CPU decode layout of the full cache (`DecodeKVCache`: per-layer buffers, batch and heads
merged, keys transposed) against the stacked `KVCache` and the dense forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA, TINY_QWEN2
from test_model import LENGTHS, TOTAL, prefill_and_decode_against_forward

from wgkv_jax.cache.full import DecodeKVCache, FullAttend, KVCache, decode_attend
from wgkv_jax.infer.generate import generate_ids
from wgkv_jax.model import hidden_states, init_params
from wgkv_jax.model.transformer import unstack_layers


def _random_cache(cfg, batch, size, seed):
    rng = np.random.default_rng(seed)
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, size, cfg.head_dim)
    return KVCache(jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32))


def test_round_trip_and_sizes():
    cfg = TINY_QWEN2
    cache = _random_cache(cfg, 3, 24, 0)
    relaid = DecodeKVCache.from_cache(cache)
    assert len(relaid.kt) == cfg.n_layers
    assert relaid.kt[0].shape == (3 * cfg.n_kv_heads, cfg.head_dim, 24)
    assert relaid.v[0].shape == (3 * cfg.n_kv_heads, 24, cfg.head_dim)
    assert relaid.size == cache.size and relaid.nbytes == cache.nbytes
    # row b, head k of layer l is row b * K + k, keys transposed
    np.testing.assert_array_equal(np.asarray(relaid.kt[1][2 * cfg.n_kv_heads + 1]), np.asarray(cache.k[1, 2, 1]).T)
    back = relaid.to_cache()
    np.testing.assert_array_equal(np.asarray(back.k), np.asarray(cache.k))
    np.testing.assert_array_equal(np.asarray(back.v), np.asarray(cache.v))
    zeros = DecodeKVCache.zeros(cfg, 2, 16)
    assert zeros.nbytes == KVCache.zeros(cfg, 2, 16).nbytes


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_QWEN2], ids=lambda c: c.arch)
def test_prefill_and_decode_equal_dense_forward(cfg):
    """Prefill into the layout, then one-token decode steps at each row's own position == the
    full forward's logits, and the final cache == the stacked cache of the same steps."""
    params = unstack_layers(init_params(cfg, jax.random.PRNGKey(2)), free=False)
    relaid = prefill_and_decode_against_forward(params, cfg, DecodeKVCache.zeros(cfg, 2, 32))
    stacked = prefill_and_decode_against_forward(params, cfg, KVCache.zeros(cfg, 2, 32))
    assert isinstance(relaid, DecodeKVCache)
    back = relaid.to_cache()
    for r, n in enumerate(LENGTHS):  # slots a row wrote (the rest hold prompt padding of either layout)
        end = n + TOTAL - max(LENGTHS)
        np.testing.assert_allclose(back.k[:, r, :, :end], stacked.k[:, r, :, :end], atol=1e-6)
        np.testing.assert_allclose(back.v[:, r, :, :end], stacked.v[:, r, :, :end], atol=1e-6)


def test_generate_unrolled_uses_layout_and_matches_stacked():
    """generate_ids on unrolled layers decodes on the layout (same tokens, streaming too, and
    the returned cache is the stacked view of the same entries)."""
    cfg = TINY_QWEN2
    base = init_params(cfg, jax.random.PRNGKey(4))
    sharp = dict(base, embed=base["embed"] * 30)  # tied head: distinct argmaxes, no near-ties
    unrolled = unstack_layers(sharp, free=False)
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, cfg.vocab_size, 21)), list(rng.integers(0, cfg.vocab_size, 9))]
    kw = dict(max_new_tokens=6, attention_impl="reference", return_cache=True)
    ids_s, _, st_s = generate_ids(sharp, cfg, prompts, **kw)
    ids_u, _, st_u = generate_ids(unrolled, cfg, prompts, **kw)
    assert ids_u == ids_s
    assert st_u["cache"].kind == "full" and st_u["cache_bytes"] == st_s["cache_bytes"]
    assert st_u["cache"].allocated_bytes == st_s["cache"].allocated_bytes
    cache_u, cache_s = st_u["cache_state"], st_s["cache_state"]
    assert isinstance(cache_u, KVCache)
    for r, p in enumerate(prompts):
        end = len(p) + len(ids_u[r]) - 1
        np.testing.assert_allclose(cache_u.k[:, r, :, :end], cache_s.k[:, r, :, :end], atol=1e-5)
    streamed = []
    ids_t, _, _ = generate_ids(unrolled, cfg, prompts, max_new_tokens=6, on_token=lambda t: streamed.append(t.copy()))
    assert ids_t == ids_s and len(streamed) == 6


def test_layout_errors():
    cfg = TINY_LLAMA
    stacked = init_params(cfg, jax.random.PRNGKey(6))  # a scan: the layer index is traced
    tokens = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(TypeError, match="static layer index"):
        hidden_states(stacked, cfg, tokens, tokens, attend=decode_attend, state=DecodeKVCache.zeros(cfg, 1, 8))
    unrolled = unstack_layers(stacked, free=False)
    with pytest.raises(ValueError, match="impl='cudnn'"):
        hidden_states(
            unrolled, cfg, tokens, tokens, attend=FullAttend("prefill", "cudnn"), state=DecodeKVCache.zeros(cfg, 1, 8)
        )
