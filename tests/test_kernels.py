"""The Pallas ragged-attention kernel (interpret mode on CPU) against its dense float32 reference,
alone and inside the dual and full caches; and the attention_impl dispatch."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA, TINY_QWEN2, TINY_QWEN3
from test_dual_cache import _run, rand_tokens

from wgkv_jax import gates
from wgkv_jax.cache import (
    CacheConfig,
    DualAttend,
    DualCache,
    FixedAdmission,
    GateAdmission,
    KVCache,
    reference_logits,
)
from wgkv_jax.cache.full import FullAttend
from wgkv_jax.infer.generate import generate_ids
from wgkv_jax.kernels import dispatch, ragged
from wgkv_jax.model import forward, init_params
from wgkv_jax.model.transformer import unstack_layers

L, B, K = 2, 2, 2


def _case(seed, g, e, dtype, t, *, ring, cap, window, lengths, sorted_pos=True):
    """Random queries at the end of each row's sequence, a ring and a global store of `cap` slots."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    end_b = jnp.array([3 * cap + window + 5, t + 3], jnp.int32)  # row 1 is young: part of its ring is empty
    pos_bt = end_b[:, None] - t + jnp.arange(t)[None, :]
    q = jax.random.normal(ks[0], (B, K, t * g, e), jnp.float32).astype(dtype)
    rk = jax.random.normal(ks[1], (L, B, K, ring, e), jnp.float32).astype(dtype) if ring else None
    rv = jax.random.normal(ks[2], (L, B, K, ring, e), jnp.float32).astype(dtype) if ring else None
    gk = jax.random.normal(ks[3], (L, B, K, cap, e), jnp.float32).astype(dtype)
    gv = jax.random.normal(ks[4], (L, B, K, cap, e), jnp.float32).astype(dtype)
    gpos = jax.random.randint(ks[5], (L, B, K, cap), 0, int(end_b[0]))
    gpos = jnp.sort(gpos, axis=-1) if sorted_pos else gpos
    glen = jnp.asarray(lengths, jnp.int32).reshape(B, K)
    q_pos_bm = jnp.repeat(pos_bt, g, axis=1)
    return (q, q_pos_bm, rk, rv, end_b, gk, gv, gpos if ring else None, glen, jnp.int32(1))


@pytest.mark.parametrize(
    "g, e, dtype, t, ring, tiling",
    [
        (1, 64, jnp.float32, 1, 48, ragged.Tiling(splits=4, block_k=16)),  # MHA decode, many splits
        (3, 128, jnp.bfloat16, 8, 64, None),  # GQA 3, prefill chunk (24 rows)
        (4, 64, jnp.bfloat16, 1, 32, None),  # GQA 4 decode
        (8, 128, jnp.float32, 16, 64, ragged.Tiling(block_m=32, block_k=32, splits=2)),  # GQA 8 chunk, 2 splits
        (4, 128, jnp.float32, 1, 0, None),  # full-cache decode (no ring, slot == position)
        (3, 64, jnp.float32, 16, 0, ragged.Tiling(block_m=16, block_k=16)),  # full-cache prefill, causal skip
    ],
)
def test_kernel_matches_reference(g, e, dtype, t, ring, tiling):
    cap, window = 64, 32
    # ragged: one head empty, one full, the others in between (not block multiples)
    args = _case(g * e + t, g, e, dtype, t, ring=ring, cap=cap, window=window, lengths=[0, cap, 37, 5])
    glob_lo = window if ring else 0
    if not ring:  # full cache: every row's length covers its queries
        args = (*args[:8], jnp.asarray([[cap, cap], [t + 3, t + 3]], jnp.int32), *args[9:])
        args = (args[0], jnp.minimum(args[1], cap - 1), *args[2:])
    ref = ragged.ragged_attention_reference(*args, window=window, glob_lo=glob_lo)
    out = ragged.ragged_attention(*args, window=window, glob_lo=glob_lo, tiling=tiling, interpret=True)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)
    assert bool(jnp.any(ref != 0))


def test_kernel_row_without_keys_is_zero_and_merge_is_exact():
    """A query that sees nothing gives zeros (not NaN); splits merge to the one-split result."""
    args = _case(3, 2, 64, jnp.float32, 1, ring=32, cap=64, window=16, lengths=[0, 0, 0, 0])
    young = (args[0], jnp.full_like(args[1], -5), *args[2:])  # positions before any key
    out = ragged.ragged_attention(*young, window=16, glob_lo=16, interpret=True)
    assert not bool(jnp.any(jnp.isnan(out))) and float(jnp.max(jnp.abs(out))) == 0.0
    args = _case(4, 2, 64, jnp.float32, 1, ring=32, cap=64, window=16, lengths=[64, 17, 40, 3])
    one = ragged.ragged_attention(*args, window=16, glob_lo=16, tiling=ragged.Tiling(splits=1), interpret=True)
    many = ragged.ragged_attention(*args, window=16, glob_lo=16, tiling=ragged.Tiling(splits=5), interpret=True)
    np.testing.assert_allclose(np.asarray(one), np.asarray(many), atol=2e-6)


@pytest.mark.parametrize("dtype, g", [(jnp.float32, 4), (jnp.bfloat16, 4), (jnp.float32, 3)])
def test_open_part_elsewhere_folds_into_the_kernel(dtype, g):
    """The prefill split: the open global slots through a flash attention (XLA here, cuDNN on GPU),
    the ring and the checked slots through the kernel, which folds the first result into its
    epilogue (`prior`) == the dense reference; row 1's heads have no open slot. G = 4: the kernel
    writes the model's [B, T, K, G, E] layout itself; G = 3 (G * E no power of two): XLA does."""
    t, e, window = 8, 64, 16
    q, q_pos, rk, rv, _, gk, gv, gpos, glen, layer = _case(
        11, g, e, dtype, t, ring=32, cap=64, window=window, lengths=[64, 17, 40, 3]
    )
    stored_before = gpos[layer] <= jnp.min(q_pos, axis=1)[:, None, None] - window
    open_len = jnp.sum((jnp.arange(64) < glen[..., None]) & stored_before, axis=-1)
    assert int(open_len[1].max()) == 0 and int(open_len[0, 0]) > 16  # open blocks and partial blocks
    args = (jnp.swapaxes(q.reshape(B, K, t, g, e), 1, 2), q_pos[:, ::g], rk, rv, gk, gv, gpos, glen, layer)
    kw = dict(window=window, glob_lo=window, open_len_bk=open_len)
    out = ragged.attend_grouped(*args, **kw, impl="interpret-xla")
    ref = ragged.attend_grouped(*args, **kw, impl="reference")
    assert out.dtype == jnp.float32
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)
    # written in the model's dtype by the kernel itself: the float32 result, rounded once
    low = ragged.attend_grouped(*args, **kw, impl="interpret-xla", out_dtype=jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(low), np.asarray(out.astype(jnp.bfloat16)))


def test_out_groups_gives_the_model_layout_and_names_a_bad_group_count():
    """ragged_attention(out_groups=G) == its [B, K, M, E] result laid out as [B, M / G, K, G, E]
    (here without a prior, where XLA transposes); a G that does not divide the rows is refused."""
    g, t = 4, 8
    args = _case(12, g, 64, jnp.float32, t, ring=32, cap=64, window=16, lengths=[64, 17, 40, 3])
    kw = dict(window=16, glob_lo=16, interpret=True)
    flat = ragged.ragged_attention(*args, **kw)
    laid = ragged.ragged_attention(*args, **kw, out_groups=g)
    want = jnp.swapaxes(flat.reshape(B, K, t, g, 64), 1, 2)
    np.testing.assert_array_equal(np.asarray(laid), np.asarray(want))
    with pytest.raises(ValueError, match="out_groups=3 does not divide the 32 query rows"):
        ragged.ragged_attention(*args, **kw, out_groups=3)


def _chunk_case(seed, dtype, *, t=64, g=2, e=64, window=16, cap=128, ring=96):
    """A dual-cache prefill chunk: per head, slots stored before it (open) then slots stored during it
    (positions in [c0 - W, c0 + t - W), seen by the chunk's later queries only), in position order."""
    rng = np.random.default_rng(seed)
    end_b = np.array([400, 150])
    c0 = end_b - t
    gpos = np.full((L, B, K, cap), 10**6, np.int64)
    n_open, glen = np.zeros((B, K), np.int32), np.zeros((B, K), np.int32)
    for b in range(B):
        for k in range(K):
            o, c = int(rng.integers(0, 40)), int(rng.integers(5, 40))
            o = 0 if (b, k) == (1, 0) else o  # a head with nothing stored before the chunk
            for layer in range(L):
                before = np.sort(rng.choice(c0[b] - window, o, replace=False))
                during = np.sort(rng.choice(np.arange(c0[b] - window, c0[b] + t - window), c, replace=False))
                gpos[layer, b, k, : o + c] = np.concatenate([before, during])
            n_open[b, k], glen[b, k] = o, o + c
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, K, t * g, e), jnp.float32).astype(dtype)
    rk, rv, gk, gv = (
        jax.random.normal(kk, shape, jnp.float32).astype(dtype)
        for kk, shape in zip(ks[1:], [(L, B, K, ring, e)] * 2 + [(L, B, K, cap, e)] * 2, strict=True)
    )
    q_pos = jnp.repeat(jnp.asarray(c0[:, None] + np.arange(t)[None]), g, axis=1)
    args = (q, q_pos, rk, rv, jnp.asarray(end_b), gk, gv, jnp.asarray(gpos, jnp.int32), jnp.asarray(glen), jnp.int32(1))
    return args, jnp.asarray(n_open)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_early_query_blocks_stop_at_their_reach(dtype):
    """A prefill chunk's early query blocks read only the checked slots they may see
    (`checked_reach` < length), with and without the open part elsewhere == the dense reference."""
    args, n_open = _chunk_case(21, dtype)
    q, q_pos, gpos, glen = args[0], args[1], args[7], args[8]
    tiling = ragged.Tiling(block_m=16, block_k=16)
    reach = ragged.checked_reach(
        q_pos, gpos[1], glen.reshape(-1), n_open.reshape(-1), block_m=16, glob_lo=16, span=128
    )  # fmt: skip
    assert bool(jnp.all(reach <= glen.reshape(-1, 1))) and bool(jnp.any(reach < glen.reshape(-1, 1)))
    assert bool(jnp.all(jnp.diff(reach, axis=1) >= 0))  # later blocks reach further
    short = ragged.checked_reach(
        q_pos, gpos[1], glen.reshape(-1), n_open.reshape(-1), block_m=16, glob_lo=16, span=8
    )  # fmt: skip
    beyond = (glen - n_open).reshape(-1) > 8  # more checked slots than the span: read them all
    assert bool(jnp.any(beyond)) and bool(jnp.all(jnp.where(beyond[:, None], short == glen.reshape(-1, 1), True)))
    kw = dict(window=16, glob_lo=16, tiling=tiling, interpret=True, open_len_bk=n_open)
    ref = ragged.ragged_attention_reference(*args, window=16, glob_lo=16)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(ragged.ragged_attention(*args, **kw)), np.asarray(ref), atol=tol, rtol=tol)
    t, g, e = 64, 2, 64
    grouped = (jnp.swapaxes(q.reshape(B, K, t, g, e), 1, 2), q_pos[:, ::g], *args[2:4], *args[5:])
    kw = dict(window=16, glob_lo=16, open_len_bk=n_open, tiling=tiling)
    out = jnp.swapaxes(ragged.attend_grouped(*grouped, **kw, impl="interpret-xla"), 1, 2).reshape(ref.shape)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)


def test_prior_without_keys_changes_nothing_and_bad_priors_are_refused():
    args = _case(12, 2, 64, jnp.float32, 1, ring=32, cap=64, window=16, lengths=[64, 17, 0, 3])
    kw = dict(window=16, glob_lo=16, interpret=True, tiling=ragged.Tiling(splits=1))
    none = (jnp.ones(args[0].shape), jnp.full(args[0].shape[:3], -jnp.inf))  # a prior over no key
    np.testing.assert_allclose(
        np.asarray(ragged.ragged_attention(*args, **kw, prior=none)), np.asarray(ragged.ragged_attention(*args, **kw)),
        atol=1e-6,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"prior needs one split.*splits=2"):
        ragged.ragged_attention(*args, **{**kw, "tiling": ragged.Tiling(splits=2)}, prior=none)
    with pytest.raises(ValueError, match="prior shapes"):
        ragged.ragged_attention(*args, **kw, prior=(none[0][:, :1], none[1]))


def test_split_runs_cover_every_block_once_and_balance():
    """The flash-decoding work plan: each block of (ring, open, checked) goes to exactly one split,
    and no split reads more than its even share, however the parts are sized."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        parts = tuple(int(x) for x in rng.integers(0, 12, size=3))
        splits = int(rng.integers(1, 9))
        hits = [np.zeros(n, int) for n in parts]
        for j in range(splits):
            runs = ragged.split_run(j, parts, splits)
            assert sum(int(c) for _, c in runs) <= -(-sum(parts) // splits)
            for (first, count), h in zip(runs, hits, strict=True):
                h[int(first) : int(first) + int(count)] += 1
        assert all((h == 1).all() for h in hits), (parts, splits, hits)


def test_merge_kernel_equals_xla_merge():
    """merge_rows (one Pallas kernel) == merge on split partials, incl. splits and rows that saw nothing."""
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    n, s, mp, e = 3, 4, 16, 32
    acc = jax.random.normal(ks[0], (n, s, mp, e), jnp.float32)
    mx = 4.0 * jax.random.normal(ks[1], (n, s, mp), jnp.float32)
    sm = jax.random.uniform(ks[2], (n, s, mp), jnp.float32, 0.5, 3.0)
    empty = jnp.zeros((n, s, mp), bool).at[0, 1].set(True).at[2, :, 3].set(True)  # a split; a row
    mx, sm = jnp.where(empty, ragged.NEG, mx), jnp.where(empty, 0.0, sm)
    acc = jnp.where(empty[..., None], 0.0, acc)
    want = ragged.merge(acc, mx, sm)
    got = ragged.merge_rows(acc, mx, sm, 5, interpret=True)
    assert got.shape == (n, 5, e)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, :5]), atol=1e-6, rtol=1e-6)
    assert float(jnp.max(jnp.abs(got[2, 3]))) == 0.0


@pytest.mark.parametrize("splits", [3, 4])  # 4: the split merge runs as a kernel; 3: in XLA
def test_kernel_reads_stacked_lengths_at_its_layer(splits):
    """[L, B, K] lengths (a decode step's, no per-layer slice) give the layer's [B, K] result."""
    args = _case(7, 4, 64, jnp.float32, 1, ring=32, cap=64, window=16, lengths=[64, 17, 40, 3])
    glen, layer = args[8], int(args[9])
    assert layer == 1
    stacked = jnp.stack([glen[::-1] // 2, glen])  # layer 0 holds other lengths
    assert stacked.shape == (L, B, K)
    ref = ragged.ragged_attention_reference(*args, window=16, glob_lo=16)
    stacked_args = (*args[:8], stacked, args[9])
    np.testing.assert_array_equal(
        np.asarray(ragged.ragged_attention_reference(*stacked_args, window=16, glob_lo=16)), np.asarray(ref)
    )
    tiling = ragged.Tiling(splits=splits, block_k=16)
    out = ragged.ragged_attention(*stacked_args, window=16, glob_lo=16, tiling=tiling, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"both \[B, K\] or both \[L, B, K\]"):
        ragged.ragged_attention(*stacked_args, window=16, glob_lo=16, open_len_bk=glen, interpret=True)


def test_kernel_rejects_unsupported_shapes():
    args = _case(5, 2, 64, jnp.float32, 1, ring=32, cap=40, window=16, lengths=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="capacity 40 is not a multiple of 16"):
        ragged.ragged_attention(*args, window=16, glob_lo=16, interpret=True)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        ragged.Tiling(block_k=24)


# ----------------------------------------------------------------------------- inside the caches


@pytest.fixture(scope="module")
def params():
    return init_params(TINY_LLAMA, jax.random.PRNGKey(0))


@pytest.mark.parametrize("mode, impl", [("random", "interpret"), ("all", "interpret-xla"), ("random", "interpret-tpu")])
def test_dual_cache_with_kernel_matches_dense_reference(params, mode, impl):
    """Chunked prefill + decode through the kernel == the dense A_i oracle (ring wrap included)."""
    cfg, window, chunk, cap = TINY_LLAMA, 16, 16, 48  # room for every admitted token (no eviction)
    adm = FixedAdmission(mode, rate=0.4, seed=1)
    tokens = rand_tokens(60, seed=2)
    cache = DualCache.zeros(cfg, 1, window, cap, chunk=chunk)
    logits = []
    for c in range(0, 48, chunk):
        out, cache = _run(
            params,
            cfg,
            cache,
            tokens[None, c : c + chunk],
            np.arange(c, c + chunk)[None],
            DualAttend(adm, impl=impl),
        )
        logits.append(out[0])
    for i in range(48, 60):
        out, cache = _run(params, cfg, cache, tokens[None, i : i + 1], np.array([[i]]), DualAttend(adm, impl=impl))
        logits.append(out[0])
    ref, _ = reference_logits(params, cfg, tokens[None], adm, window)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(logits)), np.asarray(ref[0]), atol=2e-5, rtol=2e-5)


def test_full_cache_with_kernel_matches_reference(params):
    cfg = TINY_LLAMA
    tokens = rand_tokens(40, seed=3)
    logits = {}
    for impl in ("reference", "interpret"):
        cache = KVCache.zeros(cfg, 1, 64)
        out, cache = _run(params, cfg, cache, tokens[None, :32], np.arange(32)[None], FullAttend("prefill", impl))
        steps = [out[0]]
        for i in range(32, 40):
            out, cache = _run(params, cfg, cache, tokens[None, i : i + 1], np.array([[i]]), FullAttend("decode", impl))
            steps.append(out[0])
        logits[impl] = np.asarray(jnp.concatenate(steps))
    np.testing.assert_allclose(logits["interpret"], logits["reference"], atol=2e-5, rtol=2e-5)


def test_generate_with_pallas_equals_reference(params):
    sharp = dict(params, lm_head=params["lm_head"] * 30)
    prompts = [list(rand_tokens(37, seed=4)), list(rand_tokens(9, seed=5))]
    adm = FixedAdmission("random", rate=0.5, seed=0)
    cc = CacheConfig(window=16, chunk=16, capacity=32)
    for cache, admission in ((None, None), (cc, adm)):
        ids = {
            impl: generate_ids(sharp, TINY_LLAMA, prompts, max_new_tokens=6, cache=cache, admission=admission,
                               attention_impl=impl)[0]
            for impl in ("reference", "pallas")
        }  # fmt: skip
        assert ids["pallas"] == ids["reference"]


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_resolution_and_fallback_warning():
    assert dispatch.ragged_impl("auto", "cpu") == "reference"
    assert dispatch.ragged_impl("auto", "gpu") == "cudnn"
    assert dispatch.ragged_impl("pallas", "gpu") == "pallas"
    assert dispatch.ragged_impl("pallas", "cpu") == "interpret"
    assert dispatch.causal_impl("auto", jnp.bfloat16, 128, "gpu") == "cudnn"
    assert dispatch.causal_impl("auto", jnp.float32, 128, "gpu") == "pallas"
    assert dispatch.causal_impl("auto", jnp.bfloat16, 128, "cpu") == "reference"
    assert dispatch.ragged_impl("pallas", "tpu") == "pallas-tpu"
    assert dispatch.ragged_impl("auto", "tpu") == "reference"  # not yet compiled on TPU hardware
    dispatch._warned.clear()
    with pytest.warns(UserWarning, match="Pallas kernels have no tpu version"):
        assert dispatch.soft_impl("pallas", 64, "tpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns only once
        assert dispatch.soft_impl("pallas", 64, "tpu") == "reference"
    with pytest.warns(UserWarning, match="attention_impl='cudnn' needs a GPU"):
        assert dispatch.ragged_impl("cudnn", "cpu") == "reference"
    with pytest.warns(UserWarning, match="cuDNN attention needs a GPU"):
        assert dispatch.causal_impl("cudnn", jnp.float32, 64, "cpu") == "reference"
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        dispatch.check_impl("flash")
    # soft-gated training attention
    assert dispatch.soft_impl("auto", 64, "gpu") == "pallas"
    assert dispatch.soft_impl("auto", 64, "cpu") == "reference"
    assert dispatch.soft_impl("auto", 48, "gpu") == "reference"  # auto never warns
    assert dispatch.soft_impl("pallas", 64, "cpu") == "interpret"
    with pytest.warns(UserWarning, match="head_dim a power of two >= 16 \\(got 48\\)"):
        assert dispatch.soft_impl("pallas", 48, "gpu") == "reference"
    with pytest.warns(UserWarning, match="cuDNN has no soft-gated attention"):
        assert dispatch.soft_impl("cudnn", 64, "gpu") == "reference"


def test_dual_attend_falls_back_on_unsupported_capacity(params):
    """A capacity that is no multiple of 16 runs the reference path, with one warning."""
    cfg = TINY_LLAMA
    adm = FixedAdmission("all")
    tokens = rand_tokens(24, seed=6)
    dispatch._warned.clear()
    with pytest.warns(UserWarning, match="capacity 20 is not a multiple of 16"):
        cache = DualCache.zeros(cfg, 1, 16, 20, chunk=16)
        out, _ = _run(params, cfg, cache, tokens[None, :16], np.arange(16)[None], DualAttend(adm, impl="interpret"))
    ref, _ = reference_logits(params, cfg, tokens[None, :16], adm, 16)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=2e-5)


# ----------------------------------------------------------------------------- unrolled layers


def test_unrolled_layers_equal_scanned(params):
    """Per-layer weight buffers (the fast GPU decode layout), plain or with fused q/k/v and
    gate/up matmuls, give the same logits and the same generation, with a real write gate sliced
    per layer, as the stacked scan."""
    cfg = TINY_LLAMA
    sharp = dict(params, lm_head=params["lm_head"] * 30)
    unrolled = unstack_layers(sharp, free=False)
    fused = unstack_layers(sharp, free=False, fuse=True)
    assert isinstance(unrolled["layers"], list) and len(unrolled["layers"]) == cfg.n_layers
    assert {"wqkv", "w_gate_up"} <= set(fused["layers"][0]) and "wq" not in fused["layers"][0]
    tokens = jnp.asarray(rand_tokens(24, seed=9))[None]
    for layout in (unrolled, fused):
        np.testing.assert_allclose(
            np.asarray(forward(layout, cfg, tokens)), np.asarray(forward(sharp, cfg, tokens)), atol=1e-5, rtol=1e-5
        )
    gate = gates.make("wgkv", cfg)
    gparams = gates.init_stacked(gate, cfg, jax.random.PRNGKey(3))
    admission = GateAdmission(gate, tau=0.5)
    prompts = [list(rand_tokens(45, seed=10)), list(rand_tokens(20, seed=11))]
    cc = CacheConfig(window=16, chunk=16, capacity=48)
    outs = [
        generate_ids(p, cfg, prompts, max_new_tokens=5, cache=cc, admission=admission, gate_params=gparams)
        for p in (sharp, unrolled, fused)
    ]
    assert outs[0][0] == outs[1][0] == outs[2][0]
    lengths = [out[2]["cache"].global_lengths for out in outs]
    assert lengths[0] == lengths[1] == lengths[2]
    assert int(np.sum(outs[0][2]["cache"].global_lengths)) > 0


@pytest.mark.parametrize("cfg", [TINY_QWEN2, TINY_QWEN3], ids=["qwen2-bias", "qwen3-qknorm"])
def test_fused_layers_with_bias_and_qk_norm(cfg):
    """The fused q/k/v split keeps each head's columns: q/k/v biases (Qwen2) and q/k norms
    (Qwen3) apply to the right slices."""
    stacked = init_params(cfg, jax.random.PRNGKey(4))
    fused = unstack_layers(stacked, free=False, fuse=True)
    tokens = jnp.asarray(rand_tokens(20, seed=12))[None]
    np.testing.assert_allclose(
        np.asarray(forward(fused, cfg, tokens)), np.asarray(forward(stacked, cfg, tokens)), atol=1e-5, rtol=1e-5
    )


def test_load_model_layer_layouts(tmp_path):
    import wgkv_jax

    with pytest.raises(ValueError, match="layers='flat'"):
        wgkv_jax.load_model("smollm2-135m", layers="flat")
    with pytest.raises(ValueError, match=r"layers='fused'.*model-parallel mesh"):
        wgkv_jax.load_model("smollm2-135m", layers="fused", mesh=object())


@pytest.mark.slow
def test_load_model_unrolled_real(smollm2):
    """The real model loaded with one buffer per layer holds the same weights, layer by layer."""
    import wgkv_jax

    unrolled = wgkv_jax.load_model("smollm2-135m", layers="unrolled")
    layers = unrolled.params["layers"]
    assert isinstance(layers, list) and len(layers) == smollm2.config.n_layers
    for name, stacked in smollm2.params["layers"].items():
        for i in (0, len(layers) - 1):
            np.testing.assert_array_equal(np.asarray(layers[i][name]), np.asarray(stacked[i]))
