"""The WG-KV dual cache: a local ring of the last W tokens plus a fixed-capacity global store.

Semantics (DESIGN.md, reference/wgkv.md section 4): query i of KV head h attends to

    A_i = {j <= i : i - j < W}  U  {j <= i - W : admitted_j}

Layout (layers stacked on a leading axis, everything static-shaped)::

    ring_k, ring_v   [L, B, K, R, E]   token at position p lives in slot p mod R, R = W + chunk
    ring_kpre        [L, B, K, R, E]   its pre-RoPE key (only for deferred gating; else size 0)
    ring_admit       [L, B, K, R]      its admission bit, ring_score its gate score
    glob_k, glob_v   [L, B, K, C, E]   admitted tokens that left the window, compacted
    glob_pos, glob_score [L, B, K, C]  their absolute positions and scores
    length           [L, B, K]         used global slots per head (ragged across heads)
    evicted          [L, B, K]         admitted tokens dropped because the store was full

Every row's positions are contiguous (left padding gives pad tokens negative positions, which
are never stored or attended), so the ring needs no position array: after a chunk ending at
position e - 1, slot s holds position e - R + ((s - e) mod R), valid when >= 0. The ring keeps
`chunk` spare slots beyond the window so that a chunk's writes never overwrite a token that
has yet to be promoted, and every buffer is written before it is read (XLA then updates the
stacked buffers in place instead of copying them for each layer).

One function, `DualAttend`, handles a chunk of any length T <= chunk (T = 1 is a decode step):
  1. the chunk's K/V, admission bits and scores are written into the ring;
  2. the T tokens that leave the window (positions c0 - W ... c0 - W + T - 1) are promoted to
     the global store if admitted (cumsum compaction + scatter with mode="drop");
  3. attention of the chunk over the ring (keys within the window) and the global store (keys
     older than the window, all admitted), i.e. exactly A_i.
On overflow the store keeps the highest-scored entries (default) and counts the rest in `evicted`;
a kept newcomer takes the slot of an evicted entry, so after an eviction the slots are no longer
in position order (attention does not care; `glob_pos` keeps every entry's position).

Axis letters: l layer, b batch, k KV head, w ring slot, c global slot, t chunk time,
g query head in a GQA group, e head dim, m = (t, g) folded query rows, s key slot.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from wgkv_jax.attention.reference import NEG_INF
from wgkv_jax.cache.admission import Admission
from wgkv_jax.kernels import dispatch, ragged, ragged_tpu
from wgkv_jax.model.config import ModelConfig


class CapacityError(RuntimeError):
    """The global cache was too small for the admitted tokens under overflow policy "error"."""


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Dual-cache settings.

    Attributes:
      window: W, the local sliding window every token lives in first (paper: 256).
      capacity: C, global slots per (layer, row, KV head). None = `capacity_fraction` of the
        tokens beyond the window (prompt + new tokens), rounded up to `block`.
      capacity_fraction: see `capacity`.
      chunk: prefill chunk length (the prompt is run in chunks; no T x T memory).
      tau: admission threshold on the gate score (g > tau).
      overflow: "evict_lowest" drops the lowest-scored entry when the store is full (counted in
        `evicted`); "error" raises `CapacityError` instead.
      defer_gating: in decode, gate the whole ring once every W steps instead of every token.
      block: the attention kernel's tile; window and chunk must be multiples of it.
    """

    window: int = 256
    capacity: int | None = None
    capacity_fraction: float = 0.5
    chunk: int = 512
    tau: float = 0.1
    overflow: Literal["evict_lowest", "error"] = "evict_lowest"
    defer_gating: bool = False
    block: int = 16

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"block={self.block} must be >= 1")
        for name in ("window", "chunk"):
            value = getattr(self, name)
            if value < 1 or value % self.block:
                raise ValueError(f"{name}={value} must be a positive multiple of the kernel block size {self.block}")
        if self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk={self.chunk} must be a power of two (prompts are padded to powers of two)")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity={self.capacity} must be >= 1 (or None for automatic)")
        if not 0.0 < self.capacity_fraction <= 1.0:
            raise ValueError(f"capacity_fraction={self.capacity_fraction} must be in (0, 1]")
        if self.overflow not in ("evict_lowest", "error"):
            raise ValueError(f"overflow={self.overflow!r}; expected 'evict_lowest' or 'error'")

    def resolve_capacity(self, total_tokens: int) -> int:
        """The static global capacity for sequences of up to `total_tokens` tokens."""
        if self.capacity is not None:
            return self.capacity
        beyond = max(total_tokens - self.window, 1)
        want = int(-(-beyond * self.capacity_fraction // 1))
        return -(-want // self.block) * self.block


@dataclasses.dataclass
class DualCache:
    ring_k: jax.Array
    ring_v: jax.Array
    ring_kpre: jax.Array
    ring_admit: jax.Array
    ring_score: jax.Array
    glob_k: jax.Array
    glob_v: jax.Array
    glob_pos: jax.Array
    glob_score: jax.Array
    length: jax.Array
    evicted: jax.Array
    window: int = dataclasses.field(default=256, metadata={"static": True})

    @classmethod
    def zeros(
        cls,
        cfg: ModelConfig,
        batch: int,
        window: int,
        capacity: int,
        dtype=jnp.float32,
        *,
        chunk: int = 1,
        defer: bool = False,
    ) -> DualCache:
        """An empty cache for chunks of up to `chunk` tokens (the ring holds W + chunk slots)."""
        lbk = (cfg.n_layers, batch, cfg.n_kv_heads)
        e, ring = cfg.head_dim, window + chunk
        return cls(
            ring_k=jnp.zeros((*lbk, ring, e), dtype),
            ring_v=jnp.zeros((*lbk, ring, e), dtype),
            ring_kpre=jnp.zeros((*lbk, ring if defer else 0, e), dtype),
            ring_admit=jnp.zeros((*lbk, ring), bool),
            ring_score=jnp.zeros((*lbk, ring), jnp.float32),
            glob_k=jnp.zeros((*lbk, capacity, e), dtype),
            glob_v=jnp.zeros((*lbk, capacity, e), dtype),
            glob_pos=jnp.full((*lbk, capacity), -1, jnp.int32),
            glob_score=jnp.zeros((*lbk, capacity), jnp.float32),
            length=jnp.zeros(lbk, jnp.int32),
            evicted=jnp.zeros(lbk, jnp.int32),
            window=window,
        )

    @property
    def ring_size(self) -> int:
        return self.ring_k.shape[3]

    @property
    def capacity(self) -> int:
        return self.glob_k.shape[3]

    @property
    def nbytes(self) -> int:
        """Allocated bytes of every buffer (K/V, bits, scores, positions, counters)."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def kv_nbytes(self) -> int:
        """Allocated bytes of the K/V payload only (ring + global store)."""
        return self.ring_k.nbytes + self.ring_v.nbytes + self.glob_k.nbytes + self.glob_v.nbytes

    def store_write(self, g_at, cand_k, cand_v, new_len, over):
        """Write candidate K/V at store slots `g_at` (an index tuple; out-of-range slots are dropped).
        Returns the updated store fields and the (new_len, over) counts, unchanged here; a paged
        store (`cache.paged.PagedDualCache`) may refuse slots when its page pool is exhausted."""
        fields = {
            "glob_k": self.glob_k.at[g_at].set(cand_k, mode="drop"),
            "glob_v": self.glob_v.at[g_at].set(cand_v, mode="drop"),
        }
        return fields, new_len, over

    def store_kv(self, layer):
        """The global store of one layer as contiguous [B, K, C, E] keys and values."""
        return self.glob_k[layer], self.glob_v[layer]

    @staticmethod
    def logical_axes(window: int) -> DualCache:
        """Logical axis names of every buffer (a pytree of the same structure as a cache of `window`)."""
        kv = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
        bits = ("layers", "batch", "kv_heads", "cache_seq")
        heads = ("layers", "batch", "kv_heads")
        return DualCache(kv, kv, kv, bits, bits, kv, kv, bits, bits, heads, heads, window=window)


jax.tree_util.register_dataclass(
    DualCache,
    data_fields=[f.name for f in dataclasses.fields(DualCache) if f.name != "window"],
    meta_fields=["window"],
)


# ----------------------------------------------------------------------------- attention over parts


def parts_attention(q_btkge, parts):
    """Softmax attention of q over several key/value parts with per-head masks, in float32.

    parts: sequence of (k_bkse, v_bkse, mask_bkts). The scores of all parts share one softmax,
    so the result equals attention over their concatenation without copying the K/V.
    """
    b, t, k, g, e = q_btkge.shape
    q_bkme = jnp.swapaxes(q_btkge, 1, 2).reshape(b, k, t * g, e) * e**-0.5
    scores = []
    for k_bkse, _, mask_bkts in parts:
        s_bkms = jnp.einsum("bkme,bkse->bkms", q_bkme.astype(k_bkse.dtype), k_bkse, preferred_element_type=jnp.float32)
        scores.append(jnp.where(jnp.repeat(mask_bkts, g, axis=2), s_bkms, NEG_INF))
    p_bkms = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for k_bkse, v_bkse, _ in parts:
        stop = start + k_bkse.shape[2]
        p = p_bkms[..., start:stop].astype(v_bkse.dtype)
        out = out + jnp.einsum("bkms,bkse->bkme", p, v_bkse, preferred_element_type=jnp.float32)
        start = stop
    return jnp.swapaxes(out.reshape(b, k, t, g, e), 1, 2)


# ----------------------------------------------------------------------------- the attend hook


def _slot_dest(length_bk, g_score_bkc, ok_bkn, c_score_bkn):
    """Where each promotion candidate goes: a global slot, or C (dropped). Also the new lengths.

    While the admitted candidates fit, they are appended at length, length + 1, ... in order.
    Otherwise the store keeps the C best scores among (stored U admitted candidates): each
    kept candidate takes a freed slot (the lowest-scored entries' slots, then empty ones), so
    only the new entries are written and the valid slots stay a prefix [0, length).
    """
    cap = g_score_bkc.shape[-1]
    n_ok_bk = jnp.sum(ok_bkn, axis=-1, dtype=jnp.int32)
    rank_bkn = jnp.cumsum(ok_bkn, axis=-1, dtype=jnp.int32) - 1

    def append(_):
        return jnp.where(ok_bkn, length_bk[..., None] + rank_bkn, cap)

    def keep_best(_):
        slot_c = jnp.arange(cap)
        s_all = jnp.concatenate(
            [jnp.where(slot_c < length_bk[..., None], g_score_bkc, -jnp.inf), jnp.where(ok_bkn, c_score_bkn, -jnp.inf)],
            axis=-1,
        )
        _, top = jax.lax.top_k(s_all, cap)  # ties keep the lower index: stored before new, older first
        kept = jnp.zeros(s_all.shape, bool)
        kept = jax.vmap(jax.vmap(lambda m, i: m.at[i].set(True)))(kept, top) & (s_all > -jnp.inf)
        hole_bkc, new_bkn = ~kept[..., :cap], kept[..., cap:]
        hole_rank = jnp.cumsum(hole_bkc, axis=-1) - 1
        slot_of_rank = jax.vmap(
            jax.vmap(lambda h, r: jnp.full(cap, cap).at[jnp.where(h, r, cap)].set(slot_c, mode="drop"))
        )(hole_bkc, hole_rank)
        new_rank = jnp.cumsum(new_bkn, axis=-1) - 1
        return jnp.where(new_bkn, jnp.take_along_axis(slot_of_rank, jnp.maximum(new_rank, 0), axis=-1), cap)

    if ok_bkn.shape[-1] == 1:  # decode: one candidate replaces the lowest score if it beats it
        slot_c = jnp.arange(cap)
        low_bk = jnp.argmin(jnp.where(slot_c < length_bk[..., None], g_score_bkc, jnp.inf), axis=-1)
        beats = c_score_bkn[..., 0] > jnp.take_along_axis(g_score_bkc, low_bk[..., None], axis=-1)[..., 0]
        full_dest = jnp.where(beats, low_bk, cap)
        dest_bkn = jnp.where(ok_bkn, jnp.where(length_bk < cap, length_bk, full_dest)[..., None], cap)
    else:
        fits = jnp.all(length_bk + n_ok_bk <= cap)
        dest_bkn = jax.lax.cond(fits, append, keep_best, None)
    new_len = jnp.minimum(length_bk + n_ok_bk, cap)
    return dest_bkn, new_len, length_bk + n_ok_bk - new_len


def _promote(cache: DualCache, leave_pos_bn, layer=None) -> tuple[DualCache, jax.Array]:
    """Move the admitted tokens at positions leave_pos_bn [B, N] from the ring to the global store.

    One layer (`layer`: an index) or every layer at once (`layer=None`). Returns the cache and the
    number of admitted candidates per head ([B, K], or [L, B, K]).
    """
    n_layers, b, k, r = cache.ring_admit.shape
    ll = jnp.arange(n_layers)[:, None, None, None] if layer is None else layer
    sel = (lambda x: x) if layer is None else (lambda x: x[layer])
    bb, kk = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
    leave_at = (ll, bb, kk, jnp.mod(leave_pos_bn, r)[:, None, :])
    ok_bkn = cache.ring_admit[leave_at] & (leave_pos_bn >= 0)[:, None, :]
    cand_score, cand_k, cand_v = cache.ring_score[leave_at], cache.ring_k[leave_at], cache.ring_v[leave_at]
    ring = (cache.ring_k, cache.ring_v, cache.ring_admit, cache.ring_score)
    if layer is None:
        # before the layers: the ring is read here and written by every layer afterwards. The
        # barrier makes those writes wait for these reads, so XLA updates the ring in place
        # instead of copying it (measured on GPU: two ring-sized copies per step without it).
        (ok_bkn, cand_score, cand_k, cand_v), ring = jax.lax.optimization_barrier(
            ((ok_bkn, cand_score, cand_k, cand_v), ring)
        )
    dest_bkn, new_len, over = _slot_dest(sel(cache.length), sel(cache.glob_score), ok_bkn, cand_score)
    g_at = (ll, bb, kk, dest_bkn)
    store, new_len_kept, over = cache.store_write(g_at, cand_k, cand_v, new_len, over)
    if new_len_kept is not new_len:  # a paged pool without a free page: the slot is not taken
        dest_bkn = jnp.where(dest_bkn >= new_len_kept[..., None], cache.capacity, dest_bkn)
        g_at, new_len = (ll, bb, kk, dest_bkn), new_len_kept
    pos_bkn = jnp.broadcast_to(leave_pos_bn[:, None, :], ok_bkn.shape)
    if layer is None:
        length, evicted = new_len, cache.evicted + over
    else:
        length, evicted = cache.length.at[layer].set(new_len), cache.evicted.at[layer].add(over)
    new = dataclasses.replace(
        cache,
        ring_k=ring[0],
        ring_v=ring[1],
        ring_admit=ring[2],
        ring_score=ring[3],
        **store,
        glob_pos=cache.glob_pos.at[g_at].set(pos_bkn, mode="drop"),
        glob_score=cache.glob_score.at[g_at].set(cand_score, mode="drop"),
        length=length,
        evicted=evicted,
    )
    return new, jnp.sum(ok_bkn, axis=-1, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class DualAttend:
    """`Attend` hook running a chunk (T >= 1 tokens of contiguous positions per row) on a DualCache.

    `defer_gating` (decode only, T == 1): the new token's gate is not computed; the last W tokens
    are gated together once a row's newest position is W - 1 (mod W), before any of them can
    leave the window.

    `batched_promotion` (decode only, T == 1): the layers skip step 2 below; the decode step calls
    `before_decode` first, which promotes the leaving token of every layer at once (a handful of
    small ops per step instead of per layer; the cache and the outputs are identical, since the
    token leaving at step p, position p - W, was written and gated at least one step earlier).

    `read_policy` (a `policies.Quest` with group="max"): each query reads only the store pages
    Quest selects from their key bounds (reference attention path; the ring is always read whole).

    All writes are scatters into the stacked [L, ...] buffers and come before every read of
    them, so XLA updates them in place under donation.
    """

    admission: Admission
    defer_gating: bool = False
    impl: str = "reference"  # resolved by kernels.dispatch.ragged_impl: reference | pallas | interpret
    batched_promotion: bool = False
    read_policy: object = None  # a policies.Quest(group="max"): each query reads its top pages of the store

    def before_decode(self, cache: DualCache, pos_b) -> DualCache:
        """Run by the decode step before the layers: with `batched_promotion`, promote the token
        each row's step pushes out of the window (position pos_b - W) in every layer."""
        if not self.batched_promotion:
            return cache
        return _promote(cache, pos_b[:, None] - cache.window)[0]

    def __call__(self, cache: DualCache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        b, t, k = q_btkgd.shape[:3]
        w, r, cap = cache.window, cache.ring_size, cache.capacity
        if t > r - w:
            raise ValueError(f"a chunk of {t} tokens needs a ring of W + {t} slots; this cache has {r} (W = {w})")
        c0_b = pos_bt[:, 0]
        k_bkte, v_bkte = jnp.swapaxes(k_btke, 1, 2), jnp.swapaxes(v_btke, 1, 2)
        bb, kk = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]

        defer = self.defer_gating and t == 1
        if defer:
            admit_bkt = jnp.zeros((b, k, t), bool)
            score_bkt = jnp.zeros((b, k, t), jnp.float32)
        else:
            admit_bkt, score_bkt = self.admission(layer, p, k_pre_btke, k_btke, v_btke, pos_bt)
            # the decision waits for this layer's keys, as a learned gate's does. A rule that needs
            # nothing of the chunk's activations (FixedAdmission, a user's positional rule) lets XLA
            # promote every layer's tokens up front, before the layers below have read the stacked
            # position array, so it copies that array once per layer (GPU trace of a 128K prefill
            # chunk with random admission: 128 -> 95 copies, 3.2 -> 2.6 ms per chunk)
            (admit_bkt, score_bkt), _ = jax.lax.optimization_barrier(((admit_bkt, score_bkt), k_btke))
        admit_bkt = admit_bkt & (pos_bt >= 0)[:, None, :]

        # Every write comes before every read of the same buffer (XLA then updates in place).
        # 1. the chunk enters the ring at slots p mod R; it overwrites positions p - R, which
        #    left the window before this chunk began (R >= W + T).
        at = (layer, bb, kk, jnp.mod(pos_bt, r)[:, None, :])
        ring_k = cache.ring_k.at[at].set(k_bkte.astype(cache.ring_k.dtype))
        ring_v = cache.ring_v.at[at].set(v_bkte.astype(cache.ring_v.dtype))
        ring_admit = cache.ring_admit.at[at].set(admit_bkt)
        ring_score = cache.ring_score.at[at].set(score_bkt)
        ring_kpre = cache.ring_kpre
        if ring_kpre.shape[3]:  # deferred gating keeps the pre-RoPE keys
            ring_kpre = ring_kpre.at[at].set(jnp.swapaxes(k_pre_btke, 1, 2).astype(ring_kpre.dtype))
            if defer:
                ring_admit, ring_score = self._refresh(
                    layer, p, w, ring_kpre, ring_k, ring_v, ring_admit, ring_score, c0_b
                )

        # 2. the T tokens leaving the window (positions c0 - W + n) move to the global store
        #    if admitted: appended, or replacing lower scores when the store is full (decode
        #    steps with `batched_promotion` did this for every layer in `before_decode`)
        length_bk = cache.length[layer]
        new = dataclasses.replace(
            cache, ring_k=ring_k, ring_v=ring_v, ring_kpre=ring_kpre, ring_admit=ring_admit, ring_score=ring_score
        )
        n_ok = 0
        promotes = not (t == 1 and self.batched_promotion)
        if promotes:
            new, n_ok = _promote(new, c0_b[:, None] - w + jnp.arange(t)[None, :], layer)
        glob_pos, new_len = new.glob_pos, new.length[layer]
        gk_l, gv_l = new.store_kv(layer)  # [B, K, C, E] (a paged store gathers its pages)

        # 3. attention: in-window keys (i - j < W) from the ring, older ones from the global
        #    store, which now holds every admitted token that left the window
        impl = "reference" if self.read_policy is not None else self.impl
        table = None  # the kernels index the stacked buffers by layer
        stacked = (ring_k, ring_v, getattr(new, "glob_k", None), getattr(new, "glob_v", None), glob_pos, layer)
        if not isinstance(new, DualCache):  # a paged store: the GPU kernel follows its page table
            if impl.endswith("-tpu"):  # the TPU kernel reads this layer's gathered view
                stacked = (ring_k[layer][None], ring_v[layer][None], gk_l[None], gv_l[None], glob_pos[layer][None], 0)
            else:
                stacked, table = (ring_k, ring_v, new.pool_k, new.pool_v, glob_pos, layer), new.table
        if impl != "reference":
            q_bkme = jnp.swapaxes(q_btkgd, 1, 2).reshape(b, k, -1, q_btkgd.shape[-1])
            if impl.endswith("-tpu"):
                problem = ragged_tpu.unsupported_tpu(q_bkme, ring_k, stacked[2])
            elif table is not None:
                problem = ragged.unsupported_paged(q_bkme, ring_k, stacked[2])
            else:
                problem = ragged.unsupported(q_bkme, ring_k, stacked[2], ragged.Tiling())
            impl = dispatch.fallback(f"dual-cache Pallas attention: {problem}") if problem else impl
        if impl != "reference":
            # the entries stored before this chunk are older than every query's window: no position
            # check for them, unless this chunk's overflow put new entries into their slots
            if promotes or impl.endswith("-tpu"):  # (a paged TPU call gets one layer's view, read at 0)
                open_len = jnp.where(length_bk + n_ok <= cap, length_bk, 0)
            else:  # a decode step after `before_decode`: nothing promoted here, every entry is open,
                # and the kernel reads the layer's lengths from the stacked array itself
                new_len = open_len = new.length
            out = ragged.attend_grouped(
                q_btkgd, pos_bt, *stacked[:5], new_len, stacked[5], window=w, glob_lo=w, impl=impl,
                open_len_bk=open_len, table=table, out_dtype=v_btke.dtype,
            )  # fmt: skip
            return out, new
        end_b = c0_b + t  # ring slot s holds position end - R + ((s - end) mod R)
        ring_pos_br = end_b[:, None] - r + jnp.mod(jnp.arange(r)[None, :] - end_b[:, None], r)
        dist_btr = pos_bt[:, :, None] - ring_pos_br[:, None, :]
        ring_mask = ((dist_btr >= 0) & (dist_btr < w) & (ring_pos_br >= 0)[:, None, :])[:, None]
        glob_mask = (jnp.arange(cap)[None, None, None, :] < new_len[..., None, None]) & (
            pos_bt[:, None, :, None] - glob_pos[layer][:, :, None, :] >= w
        )
        if self.read_policy is not None:  # Quest: the pages whose key bounds promise the most
            live_bkc = jnp.arange(cap)[None, None, :] < new_len[..., None]
            read_btkc = self.read_policy.keep(pos=glob_pos[layer], valid=live_bkc, k=gk_l, q=q_btkgd, q_pos=pos_bt)
            glob_mask = glob_mask & jnp.swapaxes(read_btkc, 1, 2)
        out = parts_attention(
            q_btkgd,
            [
                (ring_k[layer], ring_v[layer], jnp.broadcast_to(ring_mask, (b, k, t, r))),
                (gk_l, gv_l, glob_mask),
            ],
        )
        return out.astype(v_btke.dtype), new

    def _refresh(self, layer, p, w, ring_kpre, ring_k, ring_v, ring_admit, ring_score, pos_b):
        """Gate the last W tokens of the rows whose newest token has position = W - 1 (mod W)."""
        r = ring_k.shape[3]
        due_b = jnp.mod(pos_b, w) == w - 1

        def run(_):
            win_pos_bw = pos_b[:, None] - w + 1 + jnp.arange(w)[None, :]
            b, k = ring_k.shape[1], ring_k.shape[2]
            at = (layer, jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], jnp.mod(win_pos_bw, r)[:, None])
            swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
            a, s = self.admission(layer, p, swap(ring_kpre[at]), swap(ring_k[at]), swap(ring_v[at]), win_pos_bw)
            due = due_b[:, None, None]
            a = jnp.where(due, a & (win_pos_bw >= 0)[:, None, :], ring_admit[at])
            s = jnp.where(due, s, ring_score[at])
            return ring_admit.at[at].set(a), ring_score.at[at].set(s)

        return jax.lax.cond(jnp.any(due_b), run, lambda _: (ring_admit, ring_score), None)
