"""The paged global store: one page pool for every layer and head, read and written through a page
table (`wgkv_jax.cache.paged`). Decoding on it must give what the contiguous store gives, while
allocating only the pages the ragged per-head lengths use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA

from wgkv_jax import policies as P
from wgkv_jax.cache import CacheConfig, FixedAdmission
from wgkv_jax.cache.dual import DualCache
from wgkv_jax.cache.paged import PagedDualCache, from_dual
from wgkv_jax.infer.generate import generate_ids
from wgkv_jax.model import init_params

CFG = TINY_LLAMA


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.PRNGKey(0))
    return dict(p, lm_head=p["lm_head"] * 30)  # decisive argmax: greedy tokens compare exactly


def run(params, prompts, paged=None, policy=None, impl="reference", new=12, capacity=64):
    return generate_ids(
        params, CFG, prompts, max_new_tokens=new, cache=CacheConfig(window=16, chunk=64, capacity=capacity),
        admission=FixedAdmission("random", 0.4, seed=3), policy=policy, attention_impl=impl,
        return_cache=True, paged=paged,
    )  # fmt: skip


def prompts_of(*sizes):
    return [np.random.default_rng(s).integers(0, CFG.vocab_size, n).tolist() for s, n in enumerate(sizes)]


def filled_cache(lengths_lbk, cap=48, e=CFG.head_dim, seed=0):
    """A DualCache whose store holds random K/V in the first lengths[l, b, k] slots of each head."""
    n_layers, b, k = lengths_lbk.shape
    cache = DualCache.zeros(CFG, b, window=8, capacity=cap)
    rng = np.random.default_rng(seed)
    live = np.arange(cap)[None, None, None] < lengths_lbk[..., None]
    kv = [np.where(live[..., None], rng.normal(size=(n_layers, b, k, cap, e)), 0).astype(np.float32) for _ in "kv"]
    pos = np.where(live, np.arange(cap)[None, None, None] * 3, -1).astype(np.int32)
    return DualCache(
        **{f: getattr(cache, f) for f in ("ring_k", "ring_v", "ring_kpre", "ring_admit", "ring_score")},
        glob_k=jnp.asarray(kv[0]), glob_v=jnp.asarray(kv[1]), glob_pos=jnp.asarray(pos),
        glob_score=jnp.asarray(rng.random((n_layers, b, k, cap)).astype(np.float32)),
        length=jnp.asarray(lengths_lbk, jnp.int32), evicted=jnp.zeros_like(cache.evicted), window=8,
    )  # fmt: skip


def test_from_dual_reads_back_every_stored_entry_and_allocates_only_used_pages():
    lengths = np.random.default_rng(1).integers(0, 49, (CFG.n_layers, 2, CFG.n_kv_heads))
    lengths[0, 0, 0], lengths[-1, -1, -1] = 0, 48  # an empty head and a full one
    cache = filled_cache(lengths)
    paged = from_dual(cache, page=16)
    assert paged.pages == int((-(-lengths // 16)).sum()) + 1  # used pages + the sentinel, no spare (room 0)
    assert int(paged.next_free) == paged.pages - 1
    for layer in range(CFG.n_layers):
        k, v = paged.store_kv(layer)
        live = np.arange(48)[None, None] < lengths[layer][..., None]
        np.testing.assert_array_equal(np.where(live[..., None], k, 0), np.asarray(cache.glob_k[layer]))
        np.testing.assert_array_equal(np.where(live[..., None], v, 0), np.asarray(cache.glob_v[layer]))
    table = np.asarray(paged.table)
    used = table[table >= 0]
    assert sorted(used.tolist()) == list(range(paged.pages - 1))  # each pool page owned by exactly one block
    assert paged.pool_k.nbytes < cache.glob_k.nbytes


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_decode_on_the_paged_store_gives_the_contiguous_tokens(params, impl):
    prompts = prompts_of(150, 97)
    want, _, dense = run(params, prompts, impl=impl, capacity=96)
    got, _, paged = run(params, prompts, paged=16, impl=impl, capacity=96)
    assert got == want
    d, p = dense["cache_state"], paged["cache_state"]
    assert isinstance(p, PagedDualCache)
    np.testing.assert_array_equal(np.asarray(p.length), np.asarray(d.length))
    assert int(np.asarray(p.evicted).sum()) == int(np.asarray(d.evicted).sum()) == 0
    for layer in range(CFG.n_layers):  # the same live entries, read through the page table
        live = np.arange(d.capacity)[None, None] < np.asarray(d.length[layer])[..., None]
        pk, _ = p.store_kv(layer)
        np.testing.assert_array_equal(np.where(live[..., None], pk, 0), np.where(live[..., None], d.glob_k[layer], 0))
    # decode allocated pages as heads crossed page boundaries, and the ragged store costs less
    spare = CFG.n_layers * len(prompts) * CFG.n_kv_heads * 1  # room for 12 new tokens: one 16-slot page a head
    assert int(p.next_free) > paged["pages"] - 1 - spare  # pages taken from the spare ones during decode
    assert paged["cache"].allocated_bytes < dense["cache"].allocated_bytes
    assert paged["cache"].stored_entries == dense["cache"].stored_entries


def test_a_full_store_replaces_entries_on_the_paged_store_as_on_the_contiguous_one(params):
    prompts = prompts_of(150, 97)  # capacity 64 per head: one head overflows during decode
    want, _, dense = run(params, prompts, capacity=64)
    got, _, paged = run(params, prompts, paged=16, capacity=64)
    d, p = dense["cache_state"], paged["cache_state"]
    assert got == want and int(np.asarray(d.evicted).sum()) > 0
    np.testing.assert_array_equal(np.asarray(p.evicted), np.asarray(d.evicted))
    np.testing.assert_array_equal(np.asarray(p.glob_pos), np.asarray(d.glob_pos))


def test_paged_store_composes_with_an_eviction_policy(params):
    prompts = prompts_of(160)
    policy = P.get("h2o", budget=P.KeepRatio(0.3), recent=4)
    want, _, _ = run(params, prompts, policy=policy, capacity=None)
    got, _, stats = run(params, prompts, policy=policy, capacity=None, paged=8)
    assert got == want and isinstance(stats["cache_state"], PagedDualCache)


def test_an_exhausted_pool_refuses_tokens_and_counts_them():
    lengths = np.full((CFG.n_layers, 1, CFG.n_kv_heads), 16)  # every head ends exactly on a page boundary
    paged = from_dual(filled_cache(lengths, cap=48), page=16, spare_pages=1)
    n_heads = CFG.n_layers * CFG.n_kv_heads
    cand = jnp.ones((CFG.n_layers, 1, CFG.n_kv_heads, 1, CFG.head_dim))
    ll = jnp.arange(CFG.n_layers)[:, None, None, None]
    bb, kk = jnp.arange(1)[:, None, None], jnp.arange(CFG.n_kv_heads)[None, :, None]
    dest = jnp.full((CFG.n_layers, 1, CFG.n_kv_heads, 1), 16)
    fields, new_len, over = paged.store_write((ll, bb, kk, dest), cand, cand, paged.length + 1, paged.evicted)
    assert int(fields["next_free"]) == paged.pages - 1  # the one spare page went to the first head
    assert int(new_len.sum()) == n_heads * 16 + 1 and int(over.sum()) == n_heads - 1
    assert int(np.asarray(fields["table"])[0, 0, 0, 1]) == paged.pages - 2
    np.testing.assert_array_equal(np.asarray(fields["pool_k"])[-1], 0)  # the sentinel page stays zero


def test_bad_paged_arguments_are_refused(params):
    cache = filled_cache(np.ones((CFG.n_layers, 1, CFG.n_kv_heads), np.int64))
    with pytest.raises(ValueError, match="page=12: expected a power of two"):
        from_dual(cache, page=12)
    with pytest.raises(ValueError, match="room=-1"):
        from_dual(cache, room=-1)
    with pytest.raises(TypeError, match="takes a DualCache"):
        from_dual(from_dual(cache))
    with pytest.raises(ValueError, match="paged=16: the paged store is a dual-cache option"):
        generate_ids(params, CFG, [[1, 2, 3]], max_new_tokens=2, paged=16)
    paged = from_dual(cache, page=16)
    ll, bb, kk = jnp.arange(CFG.n_layers)[:, None, None, None], jnp.zeros((1, 1, 1), int), jnp.zeros((1, 1, 1), int)
    with pytest.raises(ValueError, match="one new token per head per step"):
        dest = jnp.zeros((CFG.n_layers, 1, 1, 2), jnp.int32)
        paged.store_write((ll, bb, kk, dest), None, None, paged.length, paged.evicted)


@pytest.mark.parametrize(
    ("dtype", "e", "g", "page"), [(jnp.float32, 64, 1, 16), (jnp.float32, 128, 4, 32), (jnp.bfloat16, 64, 8, 16)]
)
def test_the_kernel_reads_through_the_page_table_like_the_gathered_reference(dtype, e, g, page):
    """Interpret-mode Pallas kernel with a page table == the dense oracle on the gathered store:
    ragged lengths (an empty head, a full one), pages scattered in the pool, GQA ratios, bf16."""
    from wgkv_jax.kernels import ragged

    rng = np.random.default_rng(e + g + page)
    n_layers, b, k, blocks, ring, w = 2, 2, 2, 4, 32, 16
    lengths = rng.integers(0, blocks * page + 1, (n_layers, b, k))
    lengths[0, 0, 0], lengths[1, 1, 1] = 0, blocks * page
    used = -(-lengths // page)
    n_pages = int(used.sum()) + 3  # some free pages and the sentinel
    order = rng.permutation(n_pages - 1)[: int(used.sum())]  # pages anywhere in the pool
    table = np.full((n_layers, b, k, blocks), -1, np.int32)
    for i, (l_, b_, k_) in enumerate(np.ndindex(n_layers, b, k)):
        start = int(used.reshape(-1)[:i].sum())
        table[l_, b_, k_, : used[l_, b_, k_]] = order[start : start + used[l_, b_, k_]]
    pool_k = jnp.asarray(rng.normal(size=(n_pages, page, e)), dtype).at[-1].set(0)
    pool_v = jnp.asarray(rng.normal(size=(n_pages, page, e)), dtype).at[-1].set(0)
    pos = 300 + np.arange(2)  # two decode rows at different positions
    glob_pos = jnp.asarray(rng.integers(0, 280, (n_layers, b, k, blocks * page)), jnp.int32)
    ring_k = jnp.asarray(rng.normal(size=(n_layers, b, k, ring, e)), dtype)
    ring_v = jnp.asarray(rng.normal(size=(n_layers, b, k, ring, e)), dtype)
    q = jnp.asarray(rng.normal(size=(b, k, g, e)), dtype)
    args = (q, jnp.asarray(np.repeat(pos[:, None], g, 1)), ring_k, ring_v, jnp.asarray(pos + 1))
    for layer in range(n_layers):
        glen = jnp.asarray(lengths[layer], jnp.int32)
        kw = dict(window=w, glob_lo=w, table=jnp.asarray(table))
        want = ragged.paged_reference(*args, pool_k, pool_v, glob_pos, glen, layer, **kw)
        got = ragged.ragged_attention(*args, pool_k, pool_v, glob_pos, glen, layer, **kw, interpret=True)
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=tol)


def test_the_kernel_refuses_pages_it_cannot_block():
    from wgkv_jax.kernels import ragged

    q = jnp.zeros((1, 1, 1, 64))
    assert "page size 8" in ragged.unsupported_paged(q, None, jnp.zeros((4, 8, 64)))
    assert ragged.unsupported_paged(q, None, jnp.zeros((4, 16, 64))) is None


def test_users_reach_the_paged_store_from_the_api(params):
    import wgkv_jax

    model = wgkv_jax.Model(config=CFG, params=params)
    ids = prompts_of(120)
    gate = "random:0.5"
    want = wgkv_jax.generate(model, ids, gate=gate, cache=CacheConfig(window=16, capacity=128), max_new_tokens=5)
    got = wgkv_jax.generate(
        model, ids, gate=gate, cache=CacheConfig(window=16, capacity=128), max_new_tokens=5, paged=16
    )
    assert got.tokens == want.tokens
    assert got.cache_stats.allocated_bytes < want.cache_stats.allocated_bytes
    with pytest.raises(ValueError, match="Cascading has no such store"):
        wgkv_jax.generate(model, ids, policy="cascading", keep_ratio=0.5, paged=16)
