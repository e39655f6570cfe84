"""Ragged attention over a dual cache (local ring + compacted global store), as a Pallas Mosaic-TPU kernel.

Same semantics, signature and result as `ragged.ragged_attention_reference`. Per (row b, KV head h)
the keys are

  * the ring: slot s holds position end_b - R + ((s - end_b) mod R); query i sees it when
    0 <= i - pos < W (and pos >= 0);
  * the global store: slot c < length[b, h] holds position gpos[c]; query i sees it when
    i - gpos >= glob_lo (W for the dual cache, 0 for a plain full cache whose slot == position).

Work split (flash attention over a key-block grid axis, as JAX's TPU `paged_attention`): the grid
is (B, K, query blocks, ring blocks + global blocks). The first three axes are "parallel"; the
last, "arbitrary", walks the program's key blocks in order (ring first) while an online softmax
(log2 units) keeps its running (max, sum, acc) in VMEM scratch; the last step normalises and
writes the [bm, E] rows (and their log2-sum-exp). A schedule computed before the call and
scalar-prefetched into SMEM (with the layer index, ring ends and head lengths) says which key
blocks each program needs:

  * of the ring, the slot blocks that hold positions [min q - W + 1, max q] of its query block
    (clipped to [end - R, end), what the ring holds): a run of consecutive slot blocks (mod the
    block count) from `ring_first`, `ring_count` of them, each visited at most once;
  * of the global store, the first cdiv(n, bk_g) blocks, n = the head's own length (for the full
    cache also at most max q + 1 - glob_lo: causal block skipping).

A step past a program's count maps, in its index_map, to the block of the step before it (the
ring's last block; the global store's first block while the ring is walked, so that it is
prefetched, and its last one after), so the pipeline issues no new DMA for it, and `pl.when`
skips its compute. Every visited block is masked exactly (ring positions computed from the slot,
global slots checked against length and position), so partly visible blocks are right.
`open_len_bk` is accepted for interface parity and ignored: the masks are exact anyway, and
decode is bound by the K/V reads.

TPU layout. The cache buffers are read in place in their layer-stacked [L, B, K, S, E] form (the
scalar-prefetched layer index goes into the index maps: no per-layer slice is copied). A key
block is [bk, E]: the slot axis on sublanes, the head dim (the full dim) on lanes; bk = `block_k`
(a multiple of 8 rows, 16 for bfloat16) or the whole axis when shorter. The last block of an axis
may be partial: its rows past the end are unspecified on TPU (NaN in interpret mode), so they are
masked out of the scores and zeroed in V. Positions glob_pos [L, B, K, C] come as [K, bk_g]
blocks (all heads, since K is the full second-minor dim; the kernel loads its head's row), so
bk_g is a multiple of 128 there. Query rows are [bm, E] blocks (bm: all rows up to 256, rounded up
to the sublane tile; rows padded), their positions a [bm, 1] column, so that masks broadcast
query x key = sublane x lane. The running max and sum are lane-replicated [bm, 128] scratch.
Scores and accumulation are float32 (HIGHEST precision matmuls for float32 inputs; for bfloat16,
bfloat16 probabilities meet bfloat16 values in the PV matmul, as in `ragged`).

Axis letters: l layer, b batch, k KV head, m query row (= (t, g) folded), i query block,
j key-block step, r ring slot, c global slot, e head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG = -1e30  # finite: a fully masked block leaves (max, sum) = (NEG, 0), never NaN
LOG2E = 1.4426950408889634  # scores are kept in log2 units, like `ragged`
LANES = 128
FAR = 2**30  # position of padded query rows (sees nothing)


def _sublanes(dtype) -> int:
    """Rows of one native tile: 8 for 4-byte dtypes, 16 for 2-byte."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _blocks(ring: int, cap: int, dtype, has_glob_pos: bool, block_k: int) -> tuple[int, int]:
    """Slots per (ring, global) block: block_k, or the whole axis when shorter. With glob_pos the
    global block is also the lane dim of a positions block: a multiple of 128 (or the whole axis)."""
    sub = _sublanes(dtype)
    if block_k < sub or block_k % sub:
        raise ValueError(f"block_k {block_k} is not a positive multiple of {sub} (the {dtype} sublane tile)")
    most_g = -(-block_k // LANES) * LANES if has_glob_pos else block_k
    return min(ring, block_k), min(cap, most_g)


def unsupported_tpu(q_bkme, ring_k, glob_k) -> str | None:
    """Why the kernel cannot take these shapes (None if it can). Any ring size and capacity go (the
    last block of an axis may be partial)."""
    e = q_bkme.shape[-1]
    if glob_k.shape[3] < 1:
        return "the global store has no slots"
    if e > LANES and e % LANES:
        return f"head_dim {e} is above {LANES} and not a multiple of {LANES}"
    if glob_k.dtype not in (jnp.float32, jnp.bfloat16):
        return f"cache dtype {glob_k.dtype} is not float32 or bfloat16"
    if ring_k is not None and ring_k.dtype != glob_k.dtype:
        return f"ring dtype {ring_k.dtype} differs from the global store's {glob_k.dtype}"
    return None


# ----------------------------------------------------------------------------- kernel


def _kernel(*refs, n_ring, window, glob_lo, ring, cap, bk_r, bk_g, scale, precision, has_ring, has_gpos, with_lse):
    layer_ref, end_ref, glen_ref, rfirst_ref, rcount_ref, gcount_ref, *refs = refs
    del layer_ref  # used by the index maps
    q_ref, qpos_ref, *refs = refs
    rk_ref, rv_ref, *refs = refs if has_ring else (None, None, *refs)
    gk_ref, gv_ref, *refs = refs
    gpos_ref, *refs = refs if has_gpos else (None, *refs)
    o_ref, *refs = refs
    lse_ref, *refs = refs if with_lse else (None, *refs)
    acc_ref, m_ref, l_ref = refs

    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    n_kv, n_q = pl.num_programs(1), pl.num_programs(2)
    bi, bhi = b * n_q + i, (b * n_kv + h) * n_q + i

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(k, v, ok):  # one key block: k, v [bk, E]; ok [bm, bk]
        q = q_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
        s = jnp.where(ok, s * (scale * LOG2E), NEG)
        m_prev = m_ref[...]  # [bm, 128], lane-replicated
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.where(ok, jnp.exp2(s - m_next[:, :1]), 0.0)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv
        m_ref[...] = m_next

    qpos = qpos_ref[...]  # [bm, 1]

    if has_ring:

        @pl.when((j < n_ring) & (j < rcount_ref[bi]))
        def _ring():
            sb = jax.lax.rem(rfirst_ref[bi] + j, n_ring)
            slot = sb * bk_r + jax.lax.broadcasted_iota(jnp.int32, (1, bk_r), 1)
            end = end_ref[b]
            base = jax.lax.rem(end, ring)
            base = jnp.where(base < 0, base + ring, base)  # end mod R
            off = slot - base  # (slot - end) mod R, from [-R, R)
            pos = end - ring + jnp.where(off < 0, off + ring, off)
            d = qpos - pos
            ok = (d >= 0) & (d < window) & (pos >= 0)
            v = rv_ref[...]
            if ring % bk_r:  # a partial last block: rows past R are out of bounds (unspecified)
                ok &= slot < ring
                v = _zero_rows(v, sb * bk_r, ring)
            update(rk_ref[...], v, ok)

    jg = j - n_ring

    @pl.when((jg >= 0) & (jg < gcount_ref[bhi]))
    def _glob():
        slot = jg * bk_g + jax.lax.broadcasted_iota(jnp.int32, (1, bk_g), 1)
        if gpos_ref is None:
            pos = slot
        else:  # [K, bk_g] -> this head's row (a dynamic sublane offset)
            pos = gpos_ref[pl.ds(h, 1), :]
        ok = (slot < glen_ref[b * n_kv + h]) & (qpos - pos >= glob_lo)  # length <= C: no slot out of bounds
        v = gv_ref[...]
        if cap % bk_g:  # a partial last block
            v = _zero_rows(v, jg * bk_g, cap)
        update(gk_ref[...], v, ok)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        sm = l_ref[...][:, :1]
        seen = sm > 0
        o_ref[...] = jnp.where(seen, acc_ref[...] / jnp.where(seen, sm, 1.0), 0.0)
        if lse_ref is not None:
            lse_ref[...] = jnp.where(seen, m_ref[...][:, :1] + jnp.log2(jnp.where(seen, sm, 1.0)), -jnp.inf)


def _zero_rows(v, start, size):
    """Rows of a [bk, E] block past the end of its axis set to 0 (p == 0 there, but 0 * NaN = NaN)."""
    rows = start + jax.lax.broadcasted_iota(jnp.int32, (v.shape[0], 1), 0)
    return jnp.where(rows < size, v, jnp.zeros_like(v))


# ----------------------------------------------------------------------------- wrapper


def _schedule(qpos_bim, end_b, glen_bk, *, window, glob_lo, ring, bk_r, bk_g, cap, has_gpos):
    """Per program, which key blocks to visit: (ring_first [B*nq], ring_count [B*nq], glob_count [B*K*nq])."""
    b, nq, _ = qpos_bim.shape
    qmax = jnp.max(qpos_bim, axis=-1)  # [B, nq]
    qmin = jnp.min(jnp.where(qpos_bim >= 0, qpos_bim, FAR), axis=-1)  # padded / pad-token rows see nothing
    if ring:
        n_ring = -(-ring // bk_r)
        end = end_b[:, None]
        lo = jnp.maximum(qmin - window + 1, jnp.maximum(end - ring, 0))  # the ring holds [end - R, end)
        hi = jnp.minimum(qmax, end - 1)
        some = hi >= lo
        lo, hi = jnp.where(some, lo, 0), jnp.where(some, hi, 0)
        first, last = (lo % ring) // bk_r, (hi % ring) // bk_r  # slot blocks of the two ends
        run = jnp.where(lo % ring <= hi % ring, last - first + 1, n_ring - first + last + 1)  # wrapping or not
        count = jnp.where(some, jnp.where(hi - lo + 1 >= ring, n_ring, jnp.minimum(run, n_ring)), 0)
    else:
        count = first = jnp.zeros((b, nq), jnp.int32)
    n = jnp.broadcast_to(jnp.clip(glen_bk, 0, cap)[:, :, None], (*glen_bk.shape, nq))
    if not has_gpos:  # slot == position: slots past max q - glob_lo are seen by no row
        n = jnp.clip(jnp.minimum(n, qmax[:, None, :] + 1 - glob_lo), 0, cap)
    gcount = (n + bk_g - 1) // bk_g
    return tuple(x.reshape(-1).astype(jnp.int32) for x in (first, count, gcount))


def ragged_attention_tpu(
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
    block_k: int = 128,
    block_m: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
    open_len_bk=None,
    return_lse: bool = False,
):
    """The Mosaic-TPU kernel; same signature and result as `ragged.ragged_attention_reference`.

    block_k: slots per key block (a multiple of the sublane tile, 8 rows or 16 for bfloat16; the
    whole axis when shorter; with glob_pos the global blocks round it up to a multiple of 128).
    block_m: query rows per program (default: all rows up to 256, rounded up to the sublane tile).
    interpret: run in TPU interpret mode on CPU: True (out-of-bounds reads of partial last blocks
    give NaN) or a `pltpu.InterpretParams`. open_len_bk: accepted and ignored (every block is masked
    exactly). return_lse: also return the log2-sum-exp [B, K, M] (-inf for rows that saw no key), as
    `ragged.ragged_attention` does. The work is jitted (the keyword options static).
    """
    del open_len_bk
    args = (q_bkme, q_pos_bm, ring_k, ring_v, ring_end_b, glob_k, glob_v, glob_pos, glob_len_bk, layer)
    if interpret is True:  # partial last blocks read past the array (unspecified on TPU): NaN here
        interpret = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
    return _ragged_attention_tpu(
        *args, window=window, glob_lo=glob_lo, block_k=block_k, block_m=block_m, interpret=interpret or False,
        return_lse=return_lse,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("window", "glob_lo", "block_k", "block_m", "interpret", "return_lse"))
def _ragged_attention_tpu(
    q_bkme, q_pos_bm, ring_k, ring_v, ring_end_b, glob_k, glob_v, glob_pos, glob_len_bk, layer, *, window, glob_lo,
    block_k, block_m, interpret, return_lse,
):  # fmt: skip
    b, k, m, e = q_bkme.shape
    problem = unsupported_tpu(q_bkme, ring_k, glob_k)
    if problem:
        raise ValueError(problem)
    dtype = glob_k.dtype
    sub = _sublanes(dtype)
    if block_m is None:
        block_m = 256
    if block_m < m and block_m % sub:
        raise ValueError(f"block_m {block_m} is not a multiple of {sub} (the {dtype} sublane tile)")
    bm = -(-min(block_m, m) // sub) * sub
    mp = -(-m // bm) * bm
    nq = mp // bm
    cap = glob_k.shape[3]
    ring = 0 if ring_k is None else ring_k.shape[3]
    bk_r, bk_g = _blocks(ring, cap, dtype, glob_pos is not None, block_k)
    n_ring = -(-ring // bk_r) if ring else 0
    n_glob = -(-cap // bk_g)

    q = jnp.pad(q_bkme.astype(dtype), ((0, 0), (0, 0), (0, mp - m), (0, 0)))
    qpos_bm = jnp.pad(q_pos_bm.astype(jnp.int32), ((0, 0), (0, mp - m)), constant_values=-FAR)
    end_b = jnp.zeros((b,), jnp.int32) if ring_end_b is None else ring_end_b.astype(jnp.int32)
    glen_bk = glob_len_bk.astype(jnp.int32)
    first, count, gcount = _schedule(
        qpos_bm.reshape(b, nq, bm), end_b, glen_bk, window=window, glob_lo=glob_lo, ring=ring, bk_r=bk_r,
        bk_g=bk_g, cap=cap, has_gpos=glob_pos is not None,
    )  # fmt: skip
    scalars = (jnp.reshape(layer, (1,)).astype(jnp.int32), end_b, glen_bk.reshape(-1), first, count, gcount)

    # index maps: (grid indices, *scalar-prefetch refs) -> block indices
    def ring_map(bi_, h, i, j, layer_ref, end_ref, glen_ref, first_ref, count_ref, gcount_ref):
        at = bi_ * nq + i
        step = jnp.minimum(j, jnp.maximum(count_ref[at] - 1, 0))  # past the count: the last block, no new DMA
        return layer_ref[0], bi_, h, jax.lax.rem(first_ref[at] + step, n_ring), 0

    def glob_step(bi_, h, i, j, gcount_ref):
        last = jnp.maximum(gcount_ref[(bi_ * k + h) * nq + i] - 1, 0)
        return jnp.clip(j - n_ring, 0, last)  # ring steps prefetch block 0; past the count: the last block

    def glob_map(bi_, h, i, j, layer_ref, end_ref, glen_ref, first_ref, count_ref, gcount_ref):
        return layer_ref[0], bi_, h, glob_step(bi_, h, i, j, gcount_ref), 0

    def gpos_map(bi_, h, i, j, layer_ref, end_ref, glen_ref, first_ref, count_ref, gcount_ref):
        return layer_ref[0], bi_, 0, glob_step(bi_, h, i, j, gcount_ref)

    rows = pl.BlockSpec((None, None, bm, e), lambda bi_, h, i, j, *_: (bi_, h, i, 0))
    in_specs = [rows, pl.BlockSpec((None, bm, 1), lambda bi_, h, i, j, *_: (bi_, i, 0))]
    inputs = [q, qpos_bm[:, :, None]]
    if ring:
        in_specs += [pl.BlockSpec((None, None, None, bk_r, e), ring_map)] * 2
        inputs += [ring_k, ring_v]
    in_specs += [pl.BlockSpec((None, None, None, bk_g, e), glob_map)] * 2
    inputs += [glob_k, glob_v]
    if glob_pos is not None:
        in_specs.append(pl.BlockSpec((None, None, k, bk_g), gpos_map))
        inputs.append(glob_pos.astype(jnp.int32))
    out_specs = [rows]
    out_shape = [jax.ShapeDtypeStruct((b, k, mp, e), jnp.float32)]
    if return_lse:
        out_specs.append(pl.BlockSpec((None, None, bm, 1), lambda bi_, h, i, j, *_: (bi_, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, k, mp, 1), jnp.float32))

    kernel = functools.partial(
        _kernel,
        n_ring=n_ring,
        window=window,
        glob_lo=glob_lo,
        ring=ring,
        cap=cap,
        bk_r=bk_r,
        bk_g=bk_g,
        scale=e**-0.5,
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
        has_ring=bool(ring),
        has_gpos=glob_pos is not None,
        with_lse=return_lse,
    )
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(b, k, nq, n_ring + n_glob),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bm, e), jnp.float32),  # acc
                pltpu.VMEM((bm, LANES), jnp.float32),  # running max (log2 units), lane-replicated
                pltpu.VMEM((bm, LANES), jnp.float32),  # running sum, lane-replicated
            ],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="wgkv_ragged_attention_tpu",
    )(*scalars, *inputs)
    o = outs[0][:, :, :m]
    return (o, outs[1][:, :, :m, 0]) if return_lse else o


def attend_grouped_tpu(
    q_btkge, pos_bt, ring_k, ring_v, glob_k, glob_v, glob_pos, glob_len_bk, layer, *, window, glob_lo,
    interpret=False, open_len_bk=None, block_k: int = 128, block_m: int | None = None, return_lse: bool = False,
):  # fmt: skip
    """`ragged.attend_grouped` through this kernel: q_btkge [B, T, K, G, E] with contiguous positions
    pos_bt [B, T] (the ring's newest position is pos_bt[:, -1]); returns [B, T, K, G, E] float32 (and
    with `return_lse` the log2-sum-exp [B, T, K, G]). The other options are `ragged_attention_tpu`'s."""
    b, t, k, g, e = q_btkge.shape
    q_bkme = jnp.swapaxes(q_btkge, 1, 2).reshape(b, k, t * g, e)
    q_pos_bm = jnp.repeat(pos_bt, g, axis=1)
    end_b = pos_bt[:, -1] + 1
    out = ragged_attention_tpu(
        q_bkme, q_pos_bm, ring_k, ring_v, end_b, glob_k, glob_v, glob_pos, glob_len_bk, layer, window=window,
        glob_lo=glob_lo, block_k=block_k, block_m=block_m, interpret=interpret, open_len_bk=open_len_bk,
        return_lse=return_lse,
    )  # fmt: skip
    o, lse = out if return_lse else (out, None)
    o = jnp.swapaxes(o.reshape(b, k, t, g, e), 1, 2)
    return (o, jnp.swapaxes(lse.reshape(b, k, t, g), 1, 2)) if return_lse else o
