"""The Mosaic-TPU ragged-attention kernel in TPU interpret mode on CPU against the dense float32
reference (`ragged.ragged_attention_reference`), and its Pallas-to-Mosaic lowering for TPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wgkv_jax.kernels import ragged, ragged_tpu

L, B, K = 2, 2, 2
BF16 = jnp.bfloat16


def _case(seed, g, e, dtype, t, *, ring, cap, window, lengths, full=False):
    """Random queries at the end of each row's sequence, a ring of `ring` slots (0: none) and a
    global store of `cap` slots in a 2-layer buffer read at layer 1. full: a plain full cache
    (glob_pos None, slot == position) with query positions inside the capacity. NumPy inputs (no
    eager JAX ops to compile)."""
    rng = np.random.default_rng(seed)
    end_b = np.array([cap if full else 3 * cap + window + 5, t + 3], np.int32)  # row 1 is young
    pos_bt = end_b[:, None] - t + np.arange(t, dtype=np.int32)[None, :]
    normal = lambda *shape: rng.standard_normal(shape, np.float32).astype(dtype)  # noqa: E731
    rk, rv = (normal(L, B, K, ring, e) if ring else None for _ in range(2))
    gk, gv = normal(L, B, K, cap, e), normal(L, B, K, cap, e)
    gpos = np.sort(rng.integers(0, end_b[0], (L, B, K, cap), dtype=np.int32), axis=-1)
    glen = np.asarray(lengths, np.int32).reshape(B, K)
    q_pos_bm = np.repeat(pos_bt, g, axis=1)
    return (normal(B, K, t * g, e), q_pos_bm, rk, rv, end_b, gk, gv, None if full else gpos, glen, np.int32(1))


@functools.cache
def _reference(**kw):
    return jax.jit(functools.partial(ragged.ragged_attention_reference, **kw))


def _check(args, tol, **kw):
    """Kernel == reference (zeros for rows that see no key); returns (out, lse) as NumPy arrays."""
    static = dict(window=kw.pop("window"), glob_lo=kw.pop("glob_lo"))
    out, lse = ragged_tpu.ragged_attention_tpu(*args, **static, **kw, interpret=True, return_lse=True)
    out, lse, ref = np.asarray(out), np.asarray(lse), np.asarray(_reference(**static)(*args))
    assert out.shape == ref.shape and out.dtype == np.float32 and lse.shape == ref.shape[:3]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    assert np.any(ref != 0) and not np.any(np.isnan(out)) and not np.any(np.isnan(lse))
    np.testing.assert_array_equal(np.isneginf(lse), np.all(ref == 0, axis=-1))  # -inf exactly where nothing seen
    return out, lse


def _merge(o1, lse1, o2, lse2):
    """Attention over two disjoint key sets, combined by their log2-sum-exps (NumPy)."""
    top = np.maximum(lse1, lse2)
    top = np.where(np.isfinite(top), top, 0.0)
    w1, w2 = np.exp2(lse1 - top)[..., None], np.exp2(lse2 - top)[..., None]
    return np.where(w1 + w2 > 0, (w1 * o1 + w2 * o2) / np.where(w1 + w2 > 0, w1 + w2, 1.0), 0.0)


@pytest.mark.parametrize(
    "g, e, dtype, t, ring, cap, kw",
    [
        (1, 128, BF16, 1, 64, 128, {}),  # MHA decode, bf16, head_dim 128: one block each
        (4, 64, np.float32, 8, 32, 128, dict(block_k=16, block_m=16)),  # chunk of 32 rows in 2 row blocks
    ],
)
def test_dual_cache_matches_reference(g, e, dtype, t, ring, cap, kw):
    """Ring + compacted global store, ragged head lengths (empty, full, in between, not block multiples)."""
    window = 16
    args = _case(g * e + t, g, e, dtype, t, ring=ring, cap=cap, window=window, lengths=[0, cap, cap - 37, 5])
    _check(args, 2e-2 if dtype == BF16 else 1e-5, window=window, glob_lo=window, **kw)


def test_dual_cache_decode_gqa_and_lse_merge():
    """GQA 4 decode, ragged head lengths; ring 48 in blocks of 32 and capacity 200 in blocks of 128:
    both last blocks partial (read past the array: NaN in interpret mode, so they must be masked).
    The log2-sum-exp is checked by a property: the ring alone (no global entries) and the global
    store alone (an empty ring: end 0) merge by it to the whole result."""
    window, cap, tol = 40, 200, 1e-5
    args = _case(5, 4, 64, np.float32, 1, ring=48, cap=cap, window=window, lengths=[0, cap, cap - 37, 5])
    kw = dict(window=window, glob_lo=window, block_k=32)
    out, lse = _check(args, tol, **kw)
    q, qpos, rk, rv, end_b, gk, gv, gpos, glen, layer = args
    o_r, lse_r = _check((q, qpos, rk, rv, end_b, gk, gv, gpos, 0 * glen, layer), tol, **kw)
    o_g, lse_g = _check((q, qpos, rk, rv, 0 * end_b, gk, gv, gpos, glen, layer), tol, **kw)
    np.testing.assert_allclose(_merge(o_r, lse_r, o_g, lse_g), out, atol=tol, rtol=tol)
    np.testing.assert_allclose(np.logaddexp2(lse_r, lse_g), lse, atol=tol, rtol=tol)
    assert np.all(np.isneginf(lse_g[0, 0]))  # head (0, 0) is empty and the ring is out of reach


def test_rows_that_see_nothing_are_zero():
    """A pad-token row (negative position) and queries older than every key they could see give
    zeros and lse -inf (shapes of the chunk case above: no new compile)."""
    window, cap = 16, 128
    q, q_pos, *rest = _case(7, 4, 64, np.float32, 8, ring=32, cap=cap, window=window, lengths=[0, cap, 91, 5])
    q_pos = q_pos.copy()
    q_pos[1, :4] = -3  # row 1's first token (its 4 query heads) is padding
    q_pos[0] = 2  # row 0 asks at position 2: its ring holds [373, 405), its store needs pos <= 2 - 16
    out, lse = _check((q, q_pos, *rest), 1e-5, window=window, glob_lo=window, block_k=16, block_m=16)
    assert np.all(out[1, :, :4] == 0) and np.all(np.isneginf(lse[1, :, :4]))
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))


@pytest.mark.parametrize(
    "g, dtype, t, kw",
    [
        (4, np.float32, 1, dict(block_k=16)),  # full-cache decode: 5 blocks (the last partial), skipping past lengths
        (1, BF16, 32, dict(block_k=16, block_m=16)),  # full-cache chunk, bf16, 2 row blocks: causal block skipping
    ],
)
def test_full_cache_matches_reference(g, dtype, t, kw):
    """No ring, glob_pos None (slot == position, causal), ragged head lengths."""
    cap = 72 if t == 1 else 64
    args = _case(11 + t, g, 64, dtype, t, ring=0, cap=cap, window=0, lengths=[0, cap, 37, t + 3], full=True)
    _check(args, 2e-2 if dtype == BF16 else 1e-5, window=0, glob_lo=0, **kw)


def test_attend_grouped_tpu_matches_reference_layout():
    """[B, T, K, G, E] in and out, positions per token, the ring's newest position = the last token's
    (the kernel call has the shapes of the dual-cache chunk case above: no new compile)."""
    t, g, e, window, cap, ring = 8, 4, 64, 16, 128, 32
    rng = np.random.default_rng(3)
    pos_bt = np.array([[200], [5]], np.int32) + np.arange(t, dtype=np.int32)[None, :]
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q = normal(B, t, K, g, e)
    rk, rv, gk, gv = (
        normal(L, B, K, ring, e),
        normal(L, B, K, ring, e),
        normal(L, B, K, cap, e),
        normal(L, B, K, cap, e),
    )
    gpos = np.sort(rng.integers(0, 200, (L, B, K, cap), dtype=np.int32), axis=-1)
    glen = np.array([[cap, 40], [0, 9]], np.int32)
    args = (q, pos_bt, rk, rv, gk, gv, gpos, glen, np.int32(1))
    kw = dict(window=window, glob_lo=window)
    out, lse = ragged_tpu.attend_grouped_tpu(*args, **kw, interpret=True, block_k=16, block_m=16, return_lse=True)
    ref = jax.jit(functools.partial(ragged.attend_grouped, **kw, impl="reference"))(*args)
    assert out.shape == (B, t, K, g, e) and out.dtype == jnp.float32 and lse.shape == (B, t, K, g)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(lse)))  # every token sees its own ring slot


def test_unsupported_shapes_and_options_are_named():
    sds = jax.ShapeDtypeStruct
    q = sds((1, 2, 4, 128), BF16)
    kv = lambda s, dtype=BF16: sds((2, 1, 2, s, 128), dtype)  # noqa: E731
    assert ragged_tpu.unsupported_tpu(q, kv(512), kv(1024)) is None
    assert ragged_tpu.unsupported_tpu(q, kv(500), kv(1000)) is None  # partial last blocks
    assert "head_dim 192" in ragged_tpu.unsupported_tpu(sds((1, 2, 4, 192), BF16), None, kv(1024))
    assert "float16" in ragged_tpu.unsupported_tpu(q, None, kv(1024, np.float16))
    assert "ring dtype" in ragged_tpu.unsupported_tpu(q, kv(512, np.float32), kv(1024))
    assert "no slots" in ragged_tpu.unsupported_tpu(q, None, kv(0))
    zeros = lambda *shape, dtype=BF16: np.zeros(shape, dtype)  # noqa: E731
    args = (zeros(1, 2, 32, 128), zeros(1, 32, dtype=np.int32), None, None, None, zeros(2, 1, 2, 1024, 128))
    args = (*args, zeros(2, 1, 2, 1024, 128), None, zeros(1, 2, dtype=np.int32), 0)
    with pytest.raises(ValueError, match="block_m 12 is not a multiple of 16"):
        ragged_tpu.ragged_attention_tpu(*args, window=0, glob_lo=0, block_m=12)
    with pytest.raises(ValueError, match="block_k 24 is not a positive multiple of 16"):
        ragged_tpu.ragged_attention_tpu(*args, window=0, glob_lo=0, block_k=24)


# ----------------------------------------------------------------------------- TPU lowering


@pytest.mark.parametrize(
    "t, dual, cap, ring",
    [
        (1, True, 1024, 512),  # decode, G = 4 rows
        (64, True, 1024, 512),  # a 256-row chunk
        (1, False, 1024, 0),  # full-cache decode
        (1, True, 1008, 513),  # partial last blocks (capacity 16 x 63, ring W + 1)
    ],
)
def test_lowers_for_tpu(t, dual, cap, ring):
    """Pallas -> Mosaic lowering for TPU, on CPU (jax.export): bf16, head_dim 128, 8 KV heads of GQA 4.
    Catches the block-shape and lowering rules checked by JAX (not those only the Mosaic compiler
    in libtpu checks)."""
    sds = jax.ShapeDtypeStruct
    b, k, g, e, window = 1, 8, 4, 128, 512
    m = t * g
    rkv = sds((L, b, k, ring, e), BF16) if dual else None
    args = (
        sds((b, k, m, e), BF16), sds((b, m), jnp.int32), rkv, rkv, sds((b,), jnp.int32),
        sds((L, b, k, cap, e), BF16), sds((L, b, k, cap, e), BF16), sds((L, b, k, cap), jnp.int32) if dual else None,
        sds((b, k), jnp.int32), sds((), jnp.int32),
    )  # fmt: skip
    fn = functools.partial(
        ragged_tpu.ragged_attention_tpu, window=window, glob_lo=window if dual else 0, return_lse=True
    )
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()
    assert [a.shape for a in exported.out_avals] == [(b, k, m, e), (b, k, m)]
