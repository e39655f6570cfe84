"""Soft-gated ("write-gated") training attention as Pallas flash-attention kernels, forward and backward.

Computes exactly what `attention.soft_gate.soft_gated_attention_reference` computes: query i
attends to key j with pos_j <= pos_i, with logit

    q_i . k_j / sqrt(E) + b_ij,   b_ij = 0 if pos_i - pos_j < W else log(max(g_j, eps)),

and differentiates it with respect to q, k, v and the gates g. The gate gradient is exact (no
straight-through or surrogate): dL/dg_j = (sum over the query rows i with pos_i - pos_j >= W, all
G heads of the group, of dS_ij) / g_j where g_j > eps, else 0 (the clamp), with dS = P * (dP - D),
D_i = rowsum(dO_i * O_i) (FlashAttention-2's softmax backward).

Layout: as in `kernels.ragged`, the G query heads of a KV head are folded with time into query
rows m = t * G + g, so each (b, k) program does [m, e] x [e, s] dots with one KV head's keys.

Work split (FlashAttention-2):
  * forward: grid (B*K, row blocks), heaviest row blocks (the last) launched first. A program
    streams the key blocks its rows can see: first those every row sees entirely beyond the
    window (no mask: the gate bias is a per-key row vector), then the rest up to the causal
    limit, masked by positions; key blocks above the diagonal are never read. Online softmax in
    log2 units (exp2); writes O and the row log2-sum-exp.
  * backward: D = rowsum(dO * O) in jnp; a dK/dV/dlog g kernel, grid (B*K, key blocks), each
    program looping over the row blocks that see its keys (all G heads are rows of that one
    program, so dk, dv and the per-key sum of far dS accumulate locally, no atomics); a dQ kernel,
    grid (B*K, row blocks), looping over key blocks like the forward. P is recomputed from q, k,
    the gates and the saved log2-sum-exp. The chain rule to g (1/g where g > eps) is in jnp.
Loop bounds per block come from the positions (searchsorted on block ends), computed outside the
kernels, so they are exact for any nondecreasing pos (training uses arange).

T is padded to a multiple of the blocks: padded keys get position PAD_POS (never attended),
padded query rows repeat the last real position and get a zero cotangent, so they add nothing to
dk, dv or dg.

Axis letters: b batch, t time, k KV head, g query head within the group, e head dim,
n = (b, k) folded, m query row (= (t, g) folded), s key time.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from wgkv_jax.attention.soft_gate import DEFAULT_EPS
from wgkv_jax.kernels.ragged import LOG2E, NEG, Tiling

PAD_POS = 2**30  # position of padded keys: after every real query (real positions must lie in [-2**29, 2**29))
MAX_WINDOW = 2**29  # windows are clamped to [0, MAX_WINDOW] (a larger one already means "never far")


# H100 sweep at T = 16384 (benchmarks/soft_flash.py, results/soft_flash_h100.json): for head_dim 128
# (Llama-3.1-8B attention) 128x32 forward tiles with 4 warps and 3 stages, and 64x64 backward tiles with
# 4 warps (8 warps ran the backward 1.8x slower); for head_dim 64 (SmolLM2) 128x64 forward tiles.
FORWARD_TILING = Tiling(block_m=128, block_k=32, num_warps=4, num_stages=3)
BACKWARD_TILING = Tiling(block_m=64, block_k=64, num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class FlashTiling:
    """Tiles of the three kernels (`ragged.Tiling`s; `splits` must stay 1).

    forward: block_m query rows per program, block_k keys per loop step.
    dkv: block_k keys per program, block_m query rows per loop step.
    dq: block_m query rows per program, block_k keys per loop step.
    """

    forward: Tiling = FORWARD_TILING
    dkv: Tiling = BACKWARD_TILING
    dq: Tiling = BACKWARD_TILING


def default_tiling(head_dim: int) -> FlashTiling:
    """FlashTiling() for head_dim >= 128; 128x64 forward tiles for smaller heads (fewer registers
    per key, so longer key blocks pay)."""
    if head_dim >= 128:
        return FlashTiling()
    return FlashTiling(forward=dataclasses.replace(FORWARD_TILING, block_k=64))


def unsupported(q_btkge, k_btke, v_btke, tiling: FlashTiling | None = None) -> str | None:
    """Why the kernels cannot take these shapes (None if they can)."""
    e = q_btkge.shape[-1]
    if e < 16 or e & (e - 1):
        return f"head_dim {e} is not a power of two >= 16"
    if k_btke.shape[-1] != e or v_btke.shape[-1] != e:
        return f"q, k and v head dims differ ({e}, {k_btke.shape[-1]}, {v_btke.shape[-1]})"
    if tiling is not None:
        for name in ("forward", "dkv", "dq"):
            if getattr(tiling, name).splits != 1:
                return f"tiling.{name}.splits is {getattr(tiling, name).splits}; the training kernels take 1"
    return None


# ----------------------------------------------------------------------------- kernels


def _logits(s, qpos, kpos, logg, window: int, masked: bool):
    """Gate bias (log2 units) added to scores s [m, s]. Unmasked blocks are wholly visible and far;
    masked ones get NEG where the key is in the query's future. Returns (s, visible, far), the
    masks None for an unmasked block."""
    if not masked:
        return s + logg[None, :], None, None
    d = qpos[:, None] - kpos[None, :]
    ok, far = d >= 0, d >= window
    return jnp.where(ok, s + jnp.where(far, logg[None, :], 0.0), NEG), ok, far


def _fwd_kernel(
    far_ref, vis_ref, q_ref, qpos_ref, k_ref, v_ref, kpos_ref, logg_ref, o_ref, lse_ref,
    *, n_kv, n_rb, block_k, window, scale, precision,
):  # fmt: skip
    n, i = pl.program_id(0), n_rb - 1 - pl.program_id(1)
    at = (n // n_kv) * n_rb + i
    n_far, n_vis = far_ref[at], vis_ref[at]
    q = q_ref[...]  # [bm, e]
    qpos = qpos_ref[...]
    bm, e = q.shape

    def step(c, carry, masked):
        acc, mx, sm = carry
        keys = pl.ds(c * block_k, block_k)
        s = plgpu.dot(q, k_ref[keys, :], trans_b=True, precision=precision) * (scale * LOG2E)
        s, ok, _ = _logits(s, qpos, kpos_ref[keys], logg_ref[keys], window, masked)
        mx_new = jnp.maximum(mx, jnp.max(s, axis=1))
        alpha = jnp.exp2(mx - mx_new)
        p = jnp.exp2(s - mx_new[:, None])
        if masked:  # a row that has seen nothing yet has mx_new = NEG: exp2(0) must not count
            p = jnp.where(ok, p, 0.0)
        sm = alpha * sm + jnp.sum(p, axis=1)
        v = v_ref[keys, :]
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, mx_new, sm

    carry = (jnp.zeros((bm, e), jnp.float32), jnp.full((bm,), NEG, jnp.float32), jnp.zeros((bm,), jnp.float32))
    carry = jax.lax.fori_loop(0, n_far, lambda c, x: step(c, x, False), carry)
    acc, mx, sm = jax.lax.fori_loop(0, n_vis - n_far, lambda c, x: step(n_far + c, x, True), carry)
    seen = sm > 0  # always true: every query sees its own key
    o_ref[...] = (acc / jnp.where(seen, sm, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, mx + jnp.log2(jnp.where(seen, sm, 1.0)), 0.0)


def _dkv_kernel(
    lo_ref, far_ref, q_ref, qpos_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kpos_ref, logg_ref,
    dk_ref, dv_ref, dlogg_ref,
    *, n_kv, n_kb, n_rb, block_m, window, scale, precision,
):  # fmt: skip
    n, c = pl.program_id(0), pl.program_id(1)
    at = (n // n_kv) * n_kb + c
    lo, first_far = lo_ref[at], far_ref[at]
    k, v = k_ref[...], v_ref[...]  # [bk, e]
    kpos, logg = kpos_ref[...], logg_ref[...]
    bk, e = k.shape

    def step(i, carry, masked):
        dk, dv, dlogg = carry
        rows = pl.ds(i * block_m, block_m)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2E)
        s, _, far = _logits(s, qpos_ref[rows], kpos, logg, window, masked)
        p = jnp.exp2(s - lse_ref[rows][:, None])  # masked entries: exp2(NEG) = 0
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta_ref[rows][:, None])  # dL/dlogit (natural units)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
        dlogg = dlogg + jnp.sum(ds if far is None else jnp.where(far, ds, 0.0), axis=0)
        return dk, dv, dlogg

    carry = (jnp.zeros((bk, e), jnp.float32), jnp.zeros((bk, e), jnp.float32), jnp.zeros((bk,), jnp.float32))
    carry = jax.lax.fori_loop(0, first_far - lo, lambda i, x: step(lo + i, x, True), carry)
    dk, dv, dlogg = jax.lax.fori_loop(0, n_rb - first_far, lambda i, x: step(first_far + i, x, False), carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dlogg_ref[...] = dlogg


def _dq_kernel(
    far_ref, vis_ref, q_ref, qpos_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, kpos_ref, logg_ref, dq_ref,
    *, n_kv, n_rb, block_k, window, scale, precision,
):  # fmt: skip
    n, i = pl.program_id(0), n_rb - 1 - pl.program_id(1)
    at = (n // n_kv) * n_rb + i
    n_far, n_vis = far_ref[at], vis_ref[at]
    q, do = q_ref[...], do_ref[...]  # [bm, e]
    qpos, lse, delta = qpos_ref[...], lse_ref[...], delta_ref[...]

    def step(c, dq, masked):
        keys = pl.ds(c * block_k, block_k)
        k = k_ref[keys, :]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2E)
        s, _, _ = _logits(s, qpos, kpos_ref[keys], logg_ref[keys], window, masked)
        p = jnp.exp2(s - lse[:, None])
        dp = plgpu.dot(do, v_ref[keys, :], trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = jax.lax.fori_loop(0, n_far, lambda c, x: step(c, x, False), dq)
    dq = jax.lax.fori_loop(0, n_vis - n_far, lambda c, x: step(n_far + c, x, True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- layout and bounds


@dataclasses.dataclass(frozen=True)
class _Problem:
    b: int
    t: int
    k: int
    g: int
    e: int
    tp: int  # padded time
    window: int  # clamped to [0, MAX_WINDOW]
    tiling: FlashTiling  # blocks fitted to the problem
    interpret: bool

    @property
    def n(self):
        return self.b * self.k

    @property
    def mp(self):
        return self.tp * self.g


def _fit(t: Tiling, rows: int, keys: int) -> Tiling:
    """Shrink blocks to the problem (a block never needs to exceed the next power of two of its axis)."""
    p2 = lambda x: max(16, 1 << (max(x, 1) - 1).bit_length())  # noqa: E731
    return dataclasses.replace(t, block_m=min(t.block_m, p2(rows)), block_k=min(t.block_k, p2(keys)))


def _problem(q_btkge, window: int, tiling: FlashTiling, interpret: bool) -> _Problem:
    b, t, k, g, e = q_btkge.shape
    tiling = FlashTiling(*(_fit(getattr(tiling, f), t * g, t) for f in ("forward", "dkv", "dq")))
    unit = 1  # T must be a multiple of every key block, and T * G of every row block
    for tl in (tiling.forward, tiling.dkv, tiling.dq):
        unit = math.lcm(unit, tl.block_k, tl.block_m // math.gcd(tl.block_m, g))
    tp = -(-t // unit) * unit
    return _Problem(b, t, k, g, e, tp, int(min(max(window, 0), MAX_WINDOW)), tiling, interpret)


def _fold_q(x_btkge, pr: _Problem):  # -> [N, Tp * G, E]
    x = jnp.pad(x_btkge, ((0, 0), (0, pr.tp - pr.t), (0, 0), (0, 0), (0, 0)))
    return jnp.swapaxes(x, 1, 2).reshape(pr.n, pr.mp, pr.e)


def _unfold_q(x_nme, pr: _Problem):  # -> [B, T, K, G, E]
    return jnp.swapaxes(x_nme.reshape(pr.b, pr.k, pr.tp, pr.g, pr.e)[:, :, : pr.t], 1, 2)


def _fold_kv(x_btke, pr: _Problem):  # -> [N, Tp, E]
    x = jnp.pad(x_btke, ((0, 0), (0, pr.tp - pr.t), (0, 0), (0, 0)))
    return jnp.swapaxes(x, 1, 2).reshape(pr.n, pr.tp, pr.e)


def _unfold_kv(x_nse, pr: _Problem):  # -> [B, T, K, E]
    return jnp.swapaxes(x_nse.reshape(pr.b, pr.k, pr.tp, pr.e)[:, :, : pr.t], 1, 2)


def _positions(pos_bt, pr: _Problem):
    """(query-row positions [B, Tp * G], key positions [B, Tp]), both nondecreasing."""
    pos = pos_bt.astype(jnp.int32)
    kpos = jnp.pad(pos, ((0, 0), (0, pr.tp - pr.t)), constant_values=PAD_POS)
    qpos = jnp.repeat(jnp.pad(pos, ((0, 0), (0, pr.tp - pr.t)), mode="edge"), pr.g, axis=1)
    return qpos, kpos


def _block_ends(qpos_bm, kpos_bs, bm: int, bk: int):
    return qpos_bm[:, ::bm], qpos_bm[:, bm - 1 :: bm], kpos_bs[:, ::bk], kpos_bs[:, bk - 1 :: bk]


def _row_block_bounds(qpos_bm, kpos_bs, tl: Tiling, window: int):
    """Per (b, row block), flattened: (number of leading key blocks every row sees wholly beyond the
    window, number of key blocks some row sees)."""
    qmin, qmax, kfirst, klast = _block_ends(qpos_bm, kpos_bs, tl.block_m, tl.block_k)
    count = jax.vmap(functools.partial(jnp.searchsorted, side="right"))
    n_vis = count(kfirst, qmax)
    n_far = jnp.minimum(count(klast, qmin - window), n_vis)
    return n_far.reshape(-1).astype(jnp.int32), n_vis.reshape(-1).astype(jnp.int32)


def _key_block_bounds(qpos_bm, kpos_bs, tl: Tiling, window: int):
    """Per (b, key block), flattened: (first row block that sees any of its keys, first row block
    from which every row sees all of them beyond the window)."""
    qmin, qmax, kfirst, klast = _block_ends(qpos_bm, kpos_bs, tl.block_m, tl.block_k)
    first = jax.vmap(functools.partial(jnp.searchsorted, side="left"))
    lo = first(qmax, kfirst)
    far = jnp.maximum(first(qmin, klast + window), lo)
    return lo.reshape(-1).astype(jnp.int32), far.reshape(-1).astype(jnp.int32)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _params(tl: Tiling):
    return plgpu.CompilerParams(num_warps=tl.num_warps, num_stages=tl.num_stages)


def _precision(dtype):
    return "highest" if dtype == jnp.float32 else None


# ----------------------------------------------------------------------------- passes


def _forward(qf, kf, vf, logg, qpos, kpos, pr: _Problem):
    """qf [N, Mp, E], kf/vf [N, Tp, E], logg [N, Tp] (log2 units) -> (O [N, Mp, E], lse [N, Mp])."""
    tl = pr.tiling.forward
    bm, n_rb = tl.block_m, pr.mp // tl.block_m
    n_far, n_vis = _row_block_bounds(qpos, kpos, tl, pr.window)
    nk = pr.k
    rows = lambda n, i: (n, n_rb - 1 - i)  # noqa: E731
    kernel = functools.partial(
        _fwd_kernel, n_kv=nk, n_rb=n_rb, block_k=tl.block_k, window=pr.window, scale=pr.e**-0.5,
        precision=_precision(qf.dtype),
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(pr.n, n_rb),
        in_specs=[
            _whole(n_far),
            _whole(n_vis),
            pl.BlockSpec((None, bm, pr.e), lambda n, i: (*rows(n, i), 0)),
            pl.BlockSpec((None, bm), lambda n, i: (n // nk, n_rb - 1 - i)),
            pl.BlockSpec((None, pr.tp, pr.e), lambda n, i: (n, 0, 0)),
            pl.BlockSpec((None, pr.tp, pr.e), lambda n, i: (n, 0, 0)),
            pl.BlockSpec((None, pr.tp), lambda n, i: (n // nk, 0)),
            pl.BlockSpec((None, pr.tp), lambda n, i: (n, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bm, pr.e), lambda n, i: (*rows(n, i), 0)),
            pl.BlockSpec((None, bm), rows),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((pr.n, pr.mp, pr.e), vf.dtype),
            jax.ShapeDtypeStruct((pr.n, pr.mp), jnp.float32),
        ],
        compiler_params=_params(tl),
        interpret=pr.interpret,
        name="wgkv_soft_flash_fwd",
    )(n_far, n_vis, qf, qpos, kf, vf, kpos, logg)


def _backward_dkv(qf, kf, vf, logg, qpos, kpos, dof, lse, delta, pr: _Problem):
    """-> (dk [N, Tp, E], dv [N, Tp, E], d logg [N, Tp] float32, natural-log units)."""
    tl = pr.tiling.dkv
    bk, n_kb, n_rb = tl.block_k, pr.tp // tl.block_k, pr.mp // tl.block_m
    lo, far = _key_block_bounds(qpos, kpos, tl, pr.window)
    nk = pr.k
    kernel = functools.partial(
        _dkv_kernel, n_kv=nk, n_kb=n_kb, n_rb=n_rb, block_m=tl.block_m, window=pr.window, scale=pr.e**-0.5,
        precision=_precision(qf.dtype),
    )  # fmt: skip
    whole_rows = lambda *shape: pl.BlockSpec((None, *shape), lambda n, c: (n,) + (0,) * len(shape))  # noqa: E731
    key_block = pl.BlockSpec((None, bk, pr.e), lambda n, c: (n, c, 0))
    return pl.pallas_call(
        kernel,
        grid=(pr.n, n_kb),
        in_specs=[
            _whole(lo),
            _whole(far),
            whole_rows(pr.mp, pr.e),  # q
            pl.BlockSpec((None, pr.mp), lambda n, c: (n // nk, 0)),  # query-row positions
            whole_rows(pr.mp, pr.e),  # dO
            whole_rows(pr.mp),  # lse
            whole_rows(pr.mp),  # delta
            key_block,
            key_block,
            pl.BlockSpec((None, bk), lambda n, c: (n // nk, c)),
            pl.BlockSpec((None, bk), lambda n, c: (n, c)),
        ],
        out_specs=[key_block, key_block, pl.BlockSpec((None, bk), lambda n, c: (n, c))],
        out_shape=[
            jax.ShapeDtypeStruct(kf.shape, kf.dtype),
            jax.ShapeDtypeStruct(vf.shape, vf.dtype),
            jax.ShapeDtypeStruct((pr.n, pr.tp), jnp.float32),
        ],
        compiler_params=_params(tl),
        interpret=pr.interpret,
        name="wgkv_soft_flash_dkv",
    )(lo, far, qf, qpos, dof, lse, delta, kf, vf, kpos, logg)


def _backward_dq(qf, kf, vf, logg, qpos, kpos, dof, lse, delta, pr: _Problem):
    """-> dq [N, Mp, E]."""
    tl = pr.tiling.dq
    bm, n_rb = tl.block_m, pr.mp // tl.block_m
    n_far, n_vis = _row_block_bounds(qpos, kpos, tl, pr.window)
    nk = pr.k
    rows = lambda n, i: (n, n_rb - 1 - i)  # noqa: E731
    row_block = pl.BlockSpec((None, bm, pr.e), lambda n, i: (*rows(n, i), 0))
    kernel = functools.partial(
        _dq_kernel, n_kv=nk, n_rb=n_rb, block_k=tl.block_k, window=pr.window, scale=pr.e**-0.5,
        precision=_precision(qf.dtype),
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(pr.n, n_rb),
        in_specs=[
            _whole(n_far),
            _whole(n_vis),
            row_block,  # q
            pl.BlockSpec((None, bm), lambda n, i: (n // nk, n_rb - 1 - i)),
            row_block,  # dO
            pl.BlockSpec((None, bm), rows),  # lse
            pl.BlockSpec((None, bm), rows),  # delta
            pl.BlockSpec((None, pr.tp, pr.e), lambda n, i: (n, 0, 0)),
            pl.BlockSpec((None, pr.tp, pr.e), lambda n, i: (n, 0, 0)),
            pl.BlockSpec((None, pr.tp), lambda n, i: (n // nk, 0)),
            pl.BlockSpec((None, pr.tp), lambda n, i: (n, 0)),
        ],
        out_specs=row_block,
        out_shape=jax.ShapeDtypeStruct(qf.shape, qf.dtype),
        compiler_params=_params(tl),
        interpret=pr.interpret,
        name="wgkv_soft_flash_dq",
    )(n_far, n_vis, qf, qpos, dof, lse, delta, kf, vf, kpos, logg)


def _inputs(q, k, v, g, pos, eps, pr: _Problem):
    """Folded, padded operands in one compute dtype; log2 of the clamped gates (padded keys: 0)."""
    dt = jnp.result_type(q.dtype, k.dtype, v.dtype)
    logg = jnp.log2(jnp.maximum(g.astype(jnp.float32), eps)).reshape(pr.n, pr.t)
    logg = jnp.pad(logg, ((0, 0), (0, pr.tp - pr.t)))
    qpos, kpos = _positions(pos, pr)
    return _fold_q(q.astype(dt), pr), _fold_kv(k.astype(dt), pr), _fold_kv(v.astype(dt), pr), logg, qpos, kpos


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, g, pos, eps: float, pr: _Problem, out_dtype):
    return _attention_fwd(q, k, v, g, pos, eps, pr, out_dtype)[0]


def _attention_fwd(q, k, v, g, pos, eps, pr, out_dtype):
    o, lse = _forward(*_inputs(q, k, v, g, pos, eps, pr), pr)
    out = _unfold_q(o, pr).astype(out_dtype)
    return out, (q, k, v, g, pos, out, lse)


def _attention_bwd(eps, pr, out_dtype, res, d_out):
    q, k, v, g, pos, out, lse = res
    qf, kf, vf, logg, qpos, kpos = _inputs(q, k, v, g, pos, eps, pr)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, K, G]
    delta = jnp.pad(delta, ((0, 0), (0, pr.tp - pr.t), (0, 0), (0, 0)))
    delta = jnp.swapaxes(delta, 1, 2).reshape(pr.n, pr.mp)
    dof = _fold_q(d_out.astype(qf.dtype), pr)
    dk, dv, dlogg = _backward_dkv(qf, kf, vf, logg, qpos, kpos, dof, lse, delta, pr)
    dq = _backward_dq(qf, kf, vf, logg, qpos, kpos, dof, lse, delta, pr)
    gf = g.astype(jnp.float32)
    dlogg = dlogg[:, : pr.t].reshape(g.shape)
    dg = jnp.where(gf > eps, dlogg / jnp.where(gf > eps, gf, 1.0), 0.0)
    return (
        _unfold_q(dq, pr).astype(q.dtype),
        _unfold_kv(dk, pr).astype(k.dtype),
        _unfold_kv(dv, pr).astype(v.dtype),
        dg.astype(g.dtype),
        None,
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("window", "eps", "tiling", "interpret"))
def soft_flash_attention(
    q_btkge,
    k_btke,
    v_btke,
    g_bkt,
    pos_bt,
    *,
    window: int,
    eps: float = DEFAULT_EPS,
    tiling: FlashTiling | None = None,
    interpret: bool = False,
):
    """Soft-gated attention through the Pallas kernels; same contract as
    `attention.soft_gate.soft_gated_attention` (q [B, T, K, G, E]; k, v [B, T, K, E]; g [B, K, T];
    pos [B, T], nondecreasing along T with |pos| < 2**29; output [B, T, K, G, E] in v's dtype),
    differentiable in q, k, v and g.

    tiling: per-kernel tiles (default: `default_tiling(head_dim)`); interpret: run the kernels
    in Pallas interpret mode (CPU). Needs head_dim a power of two >= 16 (see `unsupported`).
    """
    if tiling is None:
        tiling = default_tiling(q_btkge.shape[-1])
    problem = unsupported(q_btkge, k_btke, v_btke, tiling)
    if problem:
        raise ValueError(problem)
    pr = _problem(q_btkge, window, tiling, interpret)
    return _attention(q_btkge, k_btke, v_btke, g_bkt, pos_bt, float(eps), pr, v_btke.dtype)
