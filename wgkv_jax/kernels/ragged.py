"""Ragged attention over a dual cache (local ring + compacted global store), as a Pallas kernel.

One kernel serves prefill chunks and decode steps. Per (row b, KV head h) the keys are

  * the ring: slot s holds position end_b - R + ((s - end_b) mod R); query i sees it when
    0 <= i - pos < W (and pos >= 0);
  * the global store: slot c < length[b, h] holds position gpos[c]; query i sees it when
    i - gpos >= glob_lo (W for the dual cache, 0 for a plain full cache whose slot == position).

Work split (flash-decoding): the grid is (B*K, query blocks, S splits). A query block reads
  * of the ring, only the positions its query block can see ([min q - W + 1, max q], in blocks
    aligned so that none wraps around the ring);
  * of the global store, the blocks of the head's *own* length (blocks past it are never read).
    The first `open_len` slots (entries every query of the block sees: for a dual-cache chunk,
    those stored before it) need no position check; the rest are checked against `glob_pos`, and
    a block of a prefill chunk's queries stops at the last checked slot any of its rows may see
    (`checked_reach`: a chunk's early queries see few of the slots stored during it).
  Ring, open and checked blocks form one sequence per (row, head), and split j reads its run of
  cdiv(total, S) consecutive blocks of it (`split_run`), so the S programs of a head read the same
  number of blocks whatever the head's length.
Programs write unnormalised partials (acc, max, sum; log2 units) that `merge` (XLA) or
`merge_rows` (one small kernel, decode) combine with log-sum-exp weights. A prefill chunk whose
open slots went through cuDNN runs one split and folds cuDNN's (o, lse) into its epilogue (`prior`).

The kernel reads the layer-stacked cache buffers in place ([L, B, K, S, E] plus a layer index),
so no per-layer slice is copied before the call.

Axis letters: l layer, b batch, k KV head, n = (b, k) folded, m query row (= (t, g) folded),
r ring slot, c global slot, e head dim, j split.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from wgkv_jax.kernels import ragged_tpu

NEG = -1e30  # finite: a fully masked block leaves (max, sum) = (NEG, 0), never NaN
LOG2E = 1.4426950408889634  # scores are kept in log2 units (exp2 is the native instruction)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tile sizes of the kernel (powers of two, >= 16 for the Triton dots)."""

    block_m: int = 16
    block_k: int = 64
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"Tiling.{name} must be a power of two >= 16, got {v}")
        if self.splits < 1:
            raise ValueError(f"Tiling.splits must be >= 1, got {self.splits}")


def decode_tiling(n_rows: int, n_heads: int, cap: int, block_k: int = 32) -> Tiling:
    """Tiles for a decode step: few query rows, and about 256 programs (n_heads = B * K times S
    splits), each >= 2 blocks. An H100 sweep at 128K (Llama-8B shape, batch 1, a scan over the 32
    layers; results/long_context_h100.json, *_tilings) put 32 splits of 32-key blocks with 4
    pipeline stages first for the dual cache (0.060 ms per layer vs 0.082 ms for 16 x 64) and
    within 1% of the best for the full cache."""
    block_m = max(16, 1 << (max(n_rows, 1) - 1).bit_length())
    splits = max(1, min(256 // max(n_heads, 1), cap // (2 * block_k)))
    return Tiling(block_m=block_m, block_k=block_k, splits=splits, num_warps=4, num_stages=4)


# H100, Llama-8B shape, 2048-token chunks (results/long_context_h100.json, pallas_tilings): 128x32 tiles with
# 4 warps and 3 stages beat 64x64 (4 warps) and 128x64 (8 warps) at 32K and 128K
PREFILL_TILING = Tiling(block_m=128, block_k=32, splits=1, num_warps=4, num_stages=3)


def prefill_tiling(n_rows: int) -> Tiling:
    """Tiles for a prefill chunk: PREFILL_TILING's row blocks (fewer rows for short chunks)."""
    block_m = min(PREFILL_TILING.block_m, max(16, 1 << (max(n_rows, 1) - 1).bit_length()))
    return dataclasses.replace(PREFILL_TILING, block_m=block_m)


# ----------------------------------------------------------------------------- reference


def layer_lengths(len_bk, layer):
    """A layer's [B, K] lengths from [B, K] or layer-stacked [L, B, K] ones (None stays None)."""
    return len_bk[layer] if len_bk is not None and len_bk.ndim == 3 else len_bk


def _ring_positions(end_b, ring: int):
    slot_r = jnp.arange(ring)
    return end_b[:, None] - ring + jnp.mod(slot_r[None, :] - end_b[:, None], ring)


def ragged_attention_reference(
    q_bkme, q_pos_bm, ring_k, ring_v, ring_end_b, glob_k, glob_v, glob_pos, glob_len_bk, layer, *, window, glob_lo
):
    """Dense float32 oracle with the kernel's signature and semantics. Returns [B, K, M, E] float32.

    ring_k/ring_v: [L, B, K, R, E] or None (no ring); glob_pos: [L, B, K, C] or None (slot ==
    position); glob_len_bk: [B, K] or layer-stacked [L, B, K]. Rows whose query sees no key come
    out as zeros.
    """
    b, k, _, e = q_bkme.shape
    glob_len_bk = layer_lengths(glob_len_bk, layer)
    q = q_bkme.astype(jnp.float32) * e**-0.5
    scores, values = [], []
    if ring_k is not None:
        rk, rv = ring_k[layer].astype(jnp.float32), ring_v[layer].astype(jnp.float32)
        rpos_br = _ring_positions(ring_end_b, rk.shape[2])
        d_bmr = q_pos_bm[:, :, None] - rpos_br[:, None, :]
        ok = (d_bmr >= 0) & (d_bmr < window) & (rpos_br >= 0)[:, None, :]
        s = jnp.einsum("bkme,bkre->bkmr", q, rk, precision="highest")
        scores.append(jnp.where(ok[:, None], s, -jnp.inf))
        values.append(rv)
    gk, gv = glob_k[layer].astype(jnp.float32), glob_v[layer].astype(jnp.float32)
    cap = gk.shape[2]
    gpos = jnp.broadcast_to(jnp.arange(cap), (b, k, cap)) if glob_pos is None else glob_pos[layer]
    ok = (jnp.arange(cap)[None, None, None, :] < glob_len_bk[:, :, None, None]) & (
        q_pos_bm[:, None, :, None] - gpos[:, :, None, :] >= glob_lo
    )
    s = jnp.einsum("bkme,bkce->bkmc", q, gk, precision="highest")
    scores.append(jnp.where(ok, s, -jnp.inf))
    values.append(gv)
    s_all = jnp.concatenate(scores, axis=-1)
    mx = jnp.max(s_all, axis=-1, keepdims=True)
    p = jnp.exp(s_all - jnp.where(jnp.isfinite(mx), mx, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkms,bkse->bkme", p, jnp.concatenate(values, axis=2), precision="highest")
    return jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)


# ----------------------------------------------------------------------------- kernel


def _kernel(
    layer_ref,
    end_ref,
    glen_ref,
    open_ref,
    reach_ref,
    q_ref,
    qpos_ref,
    rk_ref,
    rv_ref,
    gk_ref,
    gv_ref,
    gpos_ref,
    table_ref,
    po_ref,
    plse_ref,
    o_ref,
    m_ref=None,
    l_ref=None,
    *,
    n_kv,
    window,
    glob_lo,
    ring,
    tiling,
    scale,
    precision,
    skip_open,
    stacked_len,
):
    n, i_blk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = n // n_kv, n % n_kv
    splits = tiling.splits
    layer = layer_ref[0]
    lrow = layer if stacked_len else 0  # lengths come [L, N] (per layer) or [1, N]
    q = q_ref[...]  # [bm, e]
    qpos = qpos_ref[...]  # [bm]
    bm, e = q.shape
    qmax = jnp.max(qpos)
    qmin = jnp.min(jnp.where(qpos >= 0, qpos, 2**30))  # padded / pad-token rows see nothing

    def step(carry, k, v, ok):
        acc, mx, sm = carry
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2E)  # log2 units
        if ok is not None:
            s = jnp.where(ok, s, NEG)
        mx_new = jnp.maximum(mx, jnp.max(s, axis=1))
        alpha = jnp.exp2(mx - mx_new)
        p = jnp.exp2(s - mx_new[:, None])
        if ok is not None:
            p = jnp.where(ok, p, 0.0)
        sm = alpha * sm + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, mx_new, sm

    # The blocks of this (row, head) come in three parts, read in turn: the ring's, the open
    # global slots', the checked global slots'. Split j reads its run of `per` consecutive blocks
    # of that sequence, so the S programs of a head read the same number of blocks (a part's
    # blocks are not dealt out separately, which would give the first splits one block of each).
    if rk_ref is not None:
        # ring: only the positions some row of this block can see, [qmin - W + 1, qmax], in
        # blocks aligned to rbk (R is a multiple of rbk, so a block never wraps around the ring)
        rbk = _block(ring, tiling.block_k)
        end = end_ref[b]
        oldest = jnp.maximum(end - ring, 0)  # the ring holds positions [end - R, end)
        lo = jnp.maximum(qmin - window + 1, oldest)
        p0 = (lo // rbk) * rbk
        n_ring = jnp.where(qmax >= lo, pl.cdiv(qmax + 1 - p0, rbk), 0)
    else:
        n_ring = 0

    # global store: slots [0, n_open) are visible to every row (no mask, no position load);
    # slots [n_open, glen) are checked against their positions. A paged store (table_ref) keeps
    # block i of this head in pool page table[layer, b, h, i]; its blocks are one page each.
    if table_ref is None:
        bk = _block(gk_ref.shape[3], tiling.block_k)

        def kv_at(start):
            return (layer, b, h, pl.ds(start, bk), slice(None))
    else:
        bk = gk_ref.shape[1]

        def kv_at(start):
            return (table_ref[layer, b, h, start // bk], slice(None), slice(None))

    glen = glen_ref[lrow, n]
    if gpos_ref is None:  # slot == position: causal block skipping
        glen = jnp.minimum(glen, qmax + 1 - glob_lo)
        n_open = jnp.clip(qmin + 1 - glob_lo, 0, glen)
    else:
        n_open = jnp.minimum(open_ref[lrow, n], glen)
    if skip_open:  # the open part is attended elsewhere (cuDNN): the checked part starts right after it
        n_open_blocks, base = 0, n_open
    else:
        n_open_blocks = n_open // bk
        base = n_open_blocks * bk
    checked_end = glen
    if reach_ref is not None:  # no row of this block sees a checked slot at or past reach (`checked_reach`)
        checked_end = jnp.minimum(glen, reach_ref[n, i_blk])
    n_checked = pl.cdiv(jnp.maximum(checked_end - base, 0), bk)

    runs = split_run(j, (n_ring, n_open_blocks, n_checked), splits)
    carry = (jnp.zeros((bm, e), jnp.float32), jnp.full((bm,), NEG, jnp.float32), jnp.zeros((bm,), jnp.float32))

    if rk_ref is not None:
        first, count = runs[0]

        def ring_body(i, carry):
            start = p0 + (first + i) * rbk
            pos = start + jnp.arange(rbk)
            d = qpos[:, None] - pos[None, :]
            ok = (d >= 0) & (d < window) & (pos >= oldest)[None, :]
            at = (layer, b, h, pl.ds(jax.lax.rem(start, ring), rbk), slice(None))
            return step(carry, rk_ref[at], rv_ref[at], ok)

        carry = jax.lax.fori_loop(0, count, ring_body, carry)

    if not skip_open:
        first, count = runs[1]

        def open_body(i, carry):
            at = kv_at((first + i) * bk)
            return step(carry, gk_ref[at], gv_ref[at], None)

        carry = jax.lax.fori_loop(0, count, open_body, carry)
    first, count = runs[2]

    def glob_body(i, carry):
        start = base + (first + i) * bk
        slot = start + jnp.arange(bk)
        live = slot < glen
        at = (layer, b, h, pl.ds(start, bk))
        pos = slot if gpos_ref is None else plgpu.load(gpos_ref.at[at], mask=live, other=0)
        ok = (qpos[:, None] - pos[None, :] >= glob_lo) & live[None, :]
        k = plgpu.load(gk_ref.at[kv_at(start)], mask=live[:, None], other=0.0)
        v = plgpu.load(gv_ref.at[kv_at(start)], mask=live[:, None], other=0.0)
        return step(carry, k, v, ok)

    acc, mx, sm = jax.lax.fori_loop(0, count, glob_body, carry)
    if po_ref is None:
        o_ref[...] = acc
        m_ref[...] = mx
        l_ref[...] = sm
        return
    # one split with a prior result over other keys (normalised o, log2-sum-exp): fold it in and
    # write the final output, instead of partials that an XLA merge would read back
    plse = plse_ref[...]
    top = jnp.maximum(mx, plse)  # finite: mx >= NEG
    a, c = jnp.exp2(mx - top), jnp.exp2(plse - top)
    den = sm * a + c
    out = (acc * a[:, None] + po_ref[...].astype(jnp.float32) * c[:, None]) / jnp.where(den > 0, den, 1.0)[:, None]
    out = jnp.where(den[:, None] > 0, out, 0.0).astype(o_ref.dtype)
    o_ref[...] = out.reshape(o_ref.shape)  # rows (t, g) -> (t, g * e) when written in the model's layout


def split_run(j, part_blocks, splits: int):
    """Split j's share of a sequence of parts (their block counts, read in order): the run of
    cdiv(total, splits) consecutive blocks starting at j * that, as (first, count) within each part.
    Every block goes to exactly one split and no split reads more than cdiv(total, splits)."""
    total = sum(part_blocks)
    per = (total + splits - 1) // splits
    lo = jnp.minimum(j * per, total)
    hi = jnp.minimum(lo + per, total)
    runs, offset = [], 0
    for n in part_blocks:
        first = jnp.clip(lo - offset, 0, n)
        runs.append((first, jnp.clip(hi - offset, 0, n) - first))
        offset = offset + n
    return runs


def checked_reach(q_pos_bm, glob_pos_bkc, glen_n, start_n, *, block_m: int, glob_lo: int, span: int):
    """Per (row b * head, query block): one past the last checked global slot that some query of the
    block may see, [N, M / block_m] int32. The checked part of a prefill chunk (slots stored during
    it, from `start`) is in position order, so a block of early queries sees only its beginning;
    the kernel stops there. Only `span` slots from `start` are looked at (a chunk stores at most as
    many as it has rows); a head with more checked slots keeps its full length."""
    b, k, cap = glob_pos_bkc.shape
    qmax_bi = jnp.max(q_pos_bm.reshape(b, -1, block_m), axis=-1)  # padded rows are -2**30
    qmax_ni = jnp.repeat(qmax_bi, k, axis=0)
    slot_ns = start_n[:, None] + jnp.arange(span)[None]
    pos_ns = jnp.take_along_axis(glob_pos_bkc.reshape(b * k, cap), jnp.minimum(slot_ns, cap - 1), axis=1)
    seen = (slot_ns < glen_n[:, None])[:, None, :] & (qmax_ni[:, :, None] - pos_ns[:, None, :] >= glob_lo)
    reach = jnp.max(jnp.where(seen, slot_ns[:, None, :] + 1, 0), axis=-1)
    return jnp.where((glen_n > start_n + span)[:, None], glen_n[:, None], reach).astype(jnp.int32)


def _block(size: int, most: int) -> int:
    """The largest power-of-two block <= most (and >= 16) that divides size."""
    bk = most
    while bk > 16 and size % bk:
        bk //= 2
    return bk


def merge(acc_njme, mx_njm, sm_njm):
    """Log-sum-exp merge of split partials (log2 units) -> normalised [N, M, E] float32; rows that
    saw no key give zeros."""
    top = jnp.max(mx_njm, axis=1)
    w = jnp.exp2(mx_njm - top[:, None])
    sm = jnp.sum(w * sm_njm, axis=1)
    acc = jnp.sum(w[..., None] * acc_njme, axis=1)
    seen = sm > 0
    return jnp.where(seen[..., None], acc / jnp.where(seen, sm, 1.0)[..., None], 0.0)


def _merge_kernel(acc_ref, mx_ref, sm_ref, o_ref):
    """One output row of one (row, head): the S split partials [S, E] combined by their maxima."""
    mx = mx_ref[...]  # [S]
    w = jnp.exp2(mx - jnp.max(mx))
    sm = jnp.sum(w * sm_ref[...])
    o = jnp.sum(w[:, None] * acc_ref[...], axis=0)
    o_ref[...] = jnp.where(sm > 0, o / jnp.where(sm > 0, sm, 1.0), 0.0)


def merge_rows(acc_njme, mx_njm, sm_njm, rows: int, *, interpret: bool = False):
    """`merge`'s output as one small Pallas kernel, for the first `rows` query rows only: [N, rows, E]
    float32. A decode step's split merge is then one launch (XLA needs a reduction for the maxima,
    then the weighted sums, then the padding slice). Needs S to be a power of two."""
    n, s, _, e = acc_njme.shape
    return pl.pallas_call(
        _merge_kernel,
        grid=(n, rows),
        in_specs=[
            pl.BlockSpec((None, s, None, e), lambda i, r: (i, 0, r, 0)),
            pl.BlockSpec((None, s, None), lambda i, r: (i, 0, r)),
            pl.BlockSpec((None, s, None), lambda i, r: (i, 0, r)),
        ],
        out_specs=pl.BlockSpec((None, None, e), lambda i, r: (i, r, 0)),
        out_shape=jax.ShapeDtypeStruct((n, rows, e), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="wgkv_ragged_merge",
    )(acc_njme, mx_njm, sm_njm)


def ragged_attention(
    q_bkme,
    q_pos_bm,
    ring_k,
    ring_v,
    ring_end_b,
    glob_k,
    glob_v,
    glob_pos,
    glob_len_bk,
    layer,
    *,
    window: int,
    glob_lo: int,
    tiling: Tiling | None = None,
    interpret: bool = False,
    open_len_bk=None,
    skip_open: bool = False,
    prior=None,
    table=None,
    reach_span: int | None = None,
    out_dtype=jnp.float32,
    out_groups: int = 0,
):
    """The Pallas kernel; same signature and result as `ragged_attention_reference`.

    `table` [L, B, K, C / page] (a paged store, `cache.paged`): glob_k / glob_v are page pools
    [P, page, E] and the kernel reads each head's blocks through the table (one page per key
    block; `paged_reference` is the oracle).

    open_len_bk [B, K]: the first global slots of each head that every query row may see (no
    position check: for a dual-cache chunk, the entries stored before it). With `skip_open`
    those slots are left out (attended by another kernel, whose result comes back through `prior`).
    prior: (o [B, K, M, E], log2-sum-exp [B, K, M]) of the same queries over keys this call does not
    read (-inf where a row saw none); the kernel folds it into its epilogue and writes the
    combined attention in `out_dtype` (float32 by default; the model's dtype saves a float32
    round trip through memory). Needs one split. Without a prior the result is float32.
    out_groups: G > 0 returns the result as [B, M / G, K, G, E], the model's [B, T, K, G, E]
    layout for rows ordered (t, g). With a prior the kernel writes that layout itself, so no
    transpose follows it (needs G * E a power of two and the row block a multiple of G; else,
    and without a prior, XLA transposes).
    reach_span: how many slots past the open part the queries' own chunk may have stored (default:
    the query rows; `attend_grouped` passes the chunk length), the span `checked_reach` looks at.
    glob_len_bk and open_len_bk may also come stacked like the buffers, [L, B, K]: the kernel then
    reads the layer's row itself (a decode step passes the cache's lengths with no per-layer slice).
    Splits are merged by `merge_rows` (one kernel) when S > 1 is a power of two, else by `merge` in XLA.
    Needs the ring size and the capacity to be multiples of 16 (see `unsupported`).
    """
    b, k, m, e = q_bkme.shape
    cap = glob_k.shape[3] if table is None else table.shape[-1] * glob_k.shape[1]
    if tiling is None:
        tiling = decode_tiling(m, b * k, cap) if m <= 64 else prefill_tiling(m)
    problem = (
        unsupported(q_bkme, ring_k, glob_k, tiling) if table is None else unsupported_paged(q_bkme, ring_k, glob_k)
    )
    if problem:
        raise ValueError(problem)
    if prior is not None and tiling.splits != 1:
        raise ValueError(f"prior needs one split (the kernel writes the final output), got splits={tiling.splits}")
    bm, s = tiling.block_m, tiling.splits
    mp = pl.cdiv(m, bm) * bm
    if out_groups and m % out_groups:
        raise ValueError(f"out_groups={out_groups} does not divide the {m} query rows")
    g_out = out_groups * e
    native_out = prior is not None and out_groups > 0 and not g_out & (g_out - 1) and bm % out_groups == 0
    q = jnp.pad(q_bkme, ((0, 0), (0, 0), (0, mp - m), (0, 0))).reshape(b * k, mp, e).astype(glob_k.dtype)
    qpos = jnp.pad(q_pos_bm.astype(jnp.int32), ((0, 0), (0, mp - m)), constant_values=-(2**30))
    ring = 0 if ring_k is None else ring_k.shape[3]
    precision = "highest" if glob_k.dtype == jnp.float32 else None
    stacked_len = glob_len_bk.ndim == 3
    kernel = functools.partial(
        _kernel,
        n_kv=k,
        window=window,
        glob_lo=glob_lo,
        ring=ring,
        tiling=tiling,
        scale=e**-0.5,
        precision=precision,
        skip_open=skip_open,
        stacked_len=stacked_len,
    )
    if open_len_bk is None:
        open_len_bk = jnp.zeros_like(glob_len_bk)
    if open_len_bk.ndim != glob_len_bk.ndim:
        raise ValueError(
            f"glob_len_bk {glob_len_bk.shape} and open_len_bk {open_len_bk.shape}: both [B, K] or both [L, B, K]"
        )
    glen_ln = glob_len_bk.reshape(-1, b * k).astype(jnp.int32)  # [L or 1, N]
    open_ln = open_len_bk.reshape(-1, b * k).astype(jnp.int32)
    end_b = jnp.zeros((b,), jnp.int32) if ring_end_b is None else ring_end_b.astype(jnp.int32)
    reach = None
    if glob_pos is not None and m > 16:  # a chunk of several positions (decode rows share one)
        lrow = layer if stacked_len else 0
        bk = _block(cap, tiling.block_k) if table is None else glob_k.shape[1]
        n_open = jnp.minimum(open_ln[lrow], glen_ln[lrow])  # the kernel's checked part starts where it does
        start = n_open if skip_open else n_open // bk * bk
        reach = checked_reach(
            qpos, glob_pos[layer], glen_ln[lrow], start, block_m=bm, glob_lo=glob_lo, span=min(cap, reach_span or m)
        )
    full = lambda x: None if x is None else pl.BlockSpec(x.shape, lambda n, i, j: (0,) * x.ndim)  # noqa: E731
    grid = (b * k, mp // bm, s)
    po = plse = None
    if prior is None:
        out_specs = [
            pl.BlockSpec((None, None, bm, e), lambda n, i, j: (n, j, i, 0)),
            pl.BlockSpec((None, None, bm), lambda n, i, j: (n, j, i)),
            pl.BlockSpec((None, None, bm), lambda n, i, j: (n, j, i)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((b * k, s, mp, e), jnp.float32),
            jax.ShapeDtypeStruct((b * k, s, mp), jnp.float32),
            jax.ShapeDtypeStruct((b * k, s, mp), jnp.float32),
        ]
    else:
        po_bkme, plse_bkm = prior
        if po_bkme.shape != q_bkme.shape or plse_bkm.shape != q_bkme.shape[:3]:
            want = (q_bkme.shape, q_bkme.shape[:3])
            raise ValueError(f"prior shapes {po_bkme.shape}, {plse_bkm.shape}: expected {want[0]}, {want[1]}")
        po = jnp.pad(po_bkme, ((0, 0), (0, 0), (0, mp - m), (0, 0))).reshape(b * k, mp, e)
        plse = jnp.pad(plse_bkm.astype(jnp.float32), ((0, 0), (0, 0), (0, mp - m)), constant_values=-jnp.inf)
        plse = plse.reshape(b * k, mp)
        if native_out:  # [B, T, K * G * E], a (t, g * e) block per program
            g = out_groups
            out_specs = [pl.BlockSpec((None, bm // g, g * e), lambda n, i, j: (n // k, i, n % k))]
            out_shape = [jax.ShapeDtypeStruct((b, mp // g, k * g * e), out_dtype)]
        else:
            out_specs = [pl.BlockSpec((None, bm, e), lambda n, i, j: (n, i, 0))]
            out_shape = [jax.ShapeDtypeStruct((b * k, mp, e), out_dtype)]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            full(jnp.zeros(1)),
            full(end_b),
            full(glen_ln),
            full(open_ln),
            full(reach),
            pl.BlockSpec((None, bm, e), lambda n, i, j: (n, i, 0)),
            pl.BlockSpec((None, bm), lambda n, i, j: (n // k, i)),
            full(ring_k),
            full(ring_v),
            full(glob_k),
            full(glob_v),
            full(glob_pos),
            full(table),
            None if po is None else pl.BlockSpec((None, bm, e), lambda n, i, j: (n, i, 0)),
            None if plse is None else pl.BlockSpec((None, bm), lambda n, i, j: (n, i)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="wgkv_ragged_attention",
    )(
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        end_b,
        glen_ln,
        open_ln,
        reach,
        q,
        qpos,
        ring_k,
        ring_v,
        glob_k,
        glob_v,
        glob_pos,
        None if table is None else table.astype(jnp.int32),
        po,
        plse,
    )
    if native_out:
        return outs[0][:, : m // out_groups].reshape(b, m // out_groups, k, out_groups, e)
    if prior is not None:
        o = outs[0][:, :m].reshape(b, k, m, e)
    elif s > 1 and not s & (s - 1):
        o = merge_rows(*outs, m, interpret=interpret).reshape(b, k, m, e)
    else:
        o = merge(*outs)[:, :m].reshape(b, k, m, e)
    return jnp.swapaxes(o.reshape(b, k, m // out_groups, out_groups, e), 1, 2) if out_groups else o


def unsupported(q_bkme, ring_k, glob_k, tiling: Tiling) -> str | None:
    """Why the kernel cannot take these shapes (None if it can)."""
    e = q_bkme.shape[-1]
    if e < 16 or e & (e - 1):
        return f"head_dim {e} is not a power of two >= 16"
    if glob_k.shape[3] % 16:
        return f"global capacity {glob_k.shape[3]} is not a multiple of 16"
    if ring_k is not None and ring_k.shape[3] % 16:
        return f"ring size {ring_k.shape[3]} is not a multiple of 16"
    return None


def unsupported_paged(q_bkme, ring_k, pool_k) -> str | None:
    """Why the kernel cannot read this page pool (None if it can)."""
    e, page = q_bkme.shape[-1], pool_k.shape[1]
    if e < 16 or e & (e - 1):
        return f"head_dim {e} is not a power of two >= 16"
    if page < 16 or page & (page - 1):
        return f"page size {page} is not a power of two >= 16 (the kernel reads one page per key block)"
    if ring_k is not None and ring_k.shape[3] % 16:
        return f"ring size {ring_k.shape[3]} is not a multiple of 16"
    return None


def gather_pages(pool, table_bkn):
    """The pages a table lists, as one contiguous [B, K, N * page, E] store per head; unallocated
    blocks (-1) read the pool's last page, the zero sentinel."""
    ids = jnp.where(table_bkn < 0, pool.shape[0] - 1, table_bkn)
    b, k, n = ids.shape
    return pool[ids].reshape(b, k, n * pool.shape[1], pool.shape[-1])


def paged_reference(q_bkme, q_pos_bm, ring_k, ring_v, ring_end_b, pool_k, pool_v, glob_pos, glob_len_bk, layer, *,
                    window, glob_lo, table):  # fmt: skip
    """The paged oracle: gather the layer's pages into a contiguous store, then the dense reference."""
    gk, gv = gather_pages(pool_k, table[layer])[None], gather_pages(pool_v, table[layer])[None]
    rk = None if ring_k is None else ring_k[layer][None]
    rv = None if ring_v is None else ring_v[layer][None]
    gpos = None if glob_pos is None else glob_pos[layer][None]
    glen = layer_lengths(glob_len_bk, layer)
    return ragged_attention_reference(
        q_bkme, q_pos_bm, rk, rv, ring_end_b, gk, gv, gpos, glen, 0, window=window, glob_lo=glob_lo
    )


def attend_grouped(
    q_btkge, pos_bt, ring_k, ring_v, glob_k, glob_v, glob_pos, glob_len_bk, layer, *, window, glob_lo, impl,
    open_len_bk=None, tiling=None, table=None, out_dtype=jnp.float32,
):  # fmt: skip
    """Attention of a chunk over a cache, on the model's layout; returns [B, T, K, G, E] in
    `out_dtype` (float32 by default; the cuDNN split path writes it from the kernel directly).

    q_btkge: [B, T, K, G, E] with positions pos_bt [B, T] (contiguous per row; the ring's newest
    position is pos_bt[:, -1]). impl: "reference"; "pallas" / "interpret" (the kernel compiled /
    on CPU); "cudnn" (GPU, chunks of T > 1: the open global slots through cuDNN flash attention
    with per-head key lengths, the ring and the rest through the kernel, merged by log-sum-exp);
    "interpret-xla" (the same split on CPU, XLA in place of cuDNN; for tests); "pallas-tpu" /
    "interpret-tpu" (the Mosaic TPU kernel of `ragged_tpu`, compiled / in TPU interpret mode). `tiling` overrides
    the kernel's default tiles (`decode_tiling` / `prefill_tiling`). `table`: glob_k / glob_v are
    the page pools of a paged store read through this page table (GPU kernel or reference; not TPU).
    glob_len_bk / open_len_bk: [B, K], or stacked [L, B, K] (read at `layer`).
    """
    b, t, k, g, e = q_btkge.shape
    if table is not None and impl.endswith("-tpu"):
        raise ValueError(f"impl={impl!r}: the TPU kernel does not read a paged store; pass its gathered view")
    if impl in ("pallas-tpu", "interpret-tpu"):
        return ragged_tpu.attend_grouped_tpu(
            q_btkge, pos_bt, ring_k, ring_v, glob_k, glob_v, glob_pos, layer_lengths(glob_len_bk, layer), layer,
            window=window, glob_lo=glob_lo, interpret=impl == "interpret-tpu",
        ).astype(out_dtype)  # fmt: skip
    q_bkme = jnp.swapaxes(q_btkge, 1, 2).reshape(b, k, t * g, e)
    q_pos_bm = jnp.repeat(pos_bt, g, axis=1)
    end_b = pos_bt[:, -1] + 1
    args = (q_bkme, q_pos_bm, ring_k, ring_v, end_b, glob_k, glob_v, glob_pos, glob_len_bk, layer)
    kw = dict(window=window, glob_lo=glob_lo, open_len_bk=open_len_bk, reach_span=t)  # a chunk stores <= t slots
    split = impl in ("cudnn", "interpret-xla") and t > 1 and open_len_bk is not None
    if table is not None:  # a paged store: glob_k / glob_v are page pools (decode chunks: no cuDNN split)
        if impl == "reference":
            o = paged_reference(*args, window=window, glob_lo=glob_lo, table=table)
        else:
            o = ragged_attention(*args, **kw, tiling=tiling, interpret=impl.startswith("interpret"), table=table)
    elif impl == "reference":
        o = ragged_attention_reference(*args, window=window, glob_lo=glob_lo)
    elif not split:
        o = ragged_attention(*args, **kw, tiling=tiling, interpret=impl.startswith("interpret"))
    else:  # cuDNN over the open slots first; the kernel reads the rest and folds cuDNN's result in
        prior = _open_attention(
            q_btkge, glob_k[layer], glob_v[layer], layer_lengths(open_len_bk, layer), cudnn=impl == "cudnn"
        )
        return ragged_attention(
            *args, **kw, tiling=tiling, interpret=impl != "cudnn", skip_open=True, prior=prior, out_dtype=out_dtype,
            out_groups=g,
        )  # fmt: skip
    return jnp.swapaxes(o.reshape(b, k, t, g, e), 1, 2).astype(out_dtype)


def _open_attention(q_btkge, k_bkce, v_bkce, open_len_bk, *, cudnn: bool):
    """Non-causal attention of every query over the first open_len global slots of its head, with
    (b, k) folded into the batch (one KV head each, G query heads). Returns ([B, K, M, E] in the
    cache's dtype, log2-sum-exp [B, K, M] float32, -inf where a head has no open slot)."""
    b, t, k, g, e = q_btkge.shape
    cap = k_bkce.shape[2]
    q = jnp.swapaxes(q_btkge, 1, 2).reshape(b * k, t, g, e).astype(k_bkce.dtype)
    lens = open_len_bk.reshape(-1).astype(jnp.int32)
    o, lse = jax.nn.dot_product_attention(
        q, k_bkce.reshape(b * k, cap, 1, e), v_bkce.reshape(b * k, cap, 1, e),
        key_value_seq_lengths=jnp.maximum(lens, 1), implementation="cudnn" if cudnn else "xla", return_residual=True,
    )  # fmt: skip
    if lse.shape[1] != t:  # [N, G, T] -> [N, T, G]
        lse = jnp.swapaxes(lse, 1, 2)
    lse = jnp.where(lens[:, None, None] > 0, lse.astype(jnp.float32) * LOG2E, -jnp.inf)
    return o.reshape(b, k, t * g, e), lse.reshape(b, k, t * g)
