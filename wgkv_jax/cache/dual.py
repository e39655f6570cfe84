"""The WG-KV dual cache: a local ring of the last W tokens plus a fixed-capacity global store.

Semantics (DESIGN.md, reference/wgkv.md section 4): query i of KV head h attends to

    A_i = {j <= i : i - j < W}  U  {j <= i - W : admitted_j}

Layout (layers stacked on a leading axis, everything static-shaped)::

    ring_k, ring_v   [L, B, K, W, E]   token at position p lives in slot p mod W
    ring_kpre        [L, B, K, W, E]   its pre-RoPE key (only for deferred gating; else W = 0)
    ring_admit       [L, B, K, W]      its admission bit, ring_score its gate score
    glob_k, glob_v   [L, B, K, C, E]   admitted tokens that left the window, compacted
    glob_pos, glob_score [L, B, K, C]  their absolute positions and scores
    length           [L, B, K]         used global slots per head (ragged across heads)
    evicted          [L, B, K]         admitted tokens dropped because the store was full

Every row's positions are contiguous (left padding gives pad tokens negative positions, which
are never stored or attended), so the ring needs no position array: before a chunk starting at
position c0, slot s holds position c0 - W + ((s - c0) mod W), valid when >= 0.

One function, `DualAttend`, handles a chunk of any length T (T = 1 is a decode step):
  1. attention of the chunk over [ring; global; chunk] with the masks of A_i;
  2. the T tokens that leave the window (positions c0 - W ... c0 - W + T - 1) are promoted to
     the global store if admitted (cumsum compaction + scatter with mode="drop");
  3. the chunk's last min(T, W) tokens are written into the ring.
On overflow the store keeps the highest-scored entries (default) and counts the rest in `evicted`.

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


@jax.tree_util.register_dataclass
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

    @classmethod
    def zeros(
        cls, cfg: ModelConfig, batch: int, window: int, capacity: int, dtype=jnp.float32, *, defer: bool = False
    ) -> DualCache:
        lbk = (cfg.n_layers, batch, cfg.n_kv_heads)
        e = cfg.head_dim
        return cls(
            ring_k=jnp.zeros((*lbk, window, e), dtype),
            ring_v=jnp.zeros((*lbk, window, e), dtype),
            ring_kpre=jnp.zeros((*lbk, window if defer else 0, e), dtype),
            ring_admit=jnp.zeros((*lbk, window), bool),
            ring_score=jnp.zeros((*lbk, window), jnp.float32),
            glob_k=jnp.zeros((*lbk, capacity, e), dtype),
            glob_v=jnp.zeros((*lbk, capacity, e), dtype),
            glob_pos=jnp.full((*lbk, capacity), -1, jnp.int32),
            glob_score=jnp.zeros((*lbk, capacity), jnp.float32),
            length=jnp.zeros(lbk, jnp.int32),
            evicted=jnp.zeros(lbk, jnp.int32),
        )

    @property
    def window(self) -> int:
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

    @staticmethod
    def logical_axes() -> DualCache:
        kv = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
        bits = ("layers", "batch", "kv_heads", "cache_seq")
        heads = ("layers", "batch", "kv_heads")
        return DualCache(kv, kv, kv, bits, bits, kv, kv, bits, bits, heads, heads)


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


def _gather_slots(x_bkw_, slots_bn):
    """x[b, k, slots[b, n]] for per-row slot indices: [B, K, W, ...] -> [B, K, N, ...]."""
    return jax.vmap(lambda x, s: jnp.take(x, s, axis=1))(x_bkw_, slots_bn)


def _scatter_slots(x_bkw_, slots_bn, new_bkn_):
    """x[b, k, slots[b, n]] = new[b, k, n] (slots >= W are dropped)."""
    return jax.vmap(lambda x, s, y: x.at[:, s].set(y, mode="drop"))(x_bkw_, slots_bn, new_bkn_)


def _promote(glob, length_bk, evicted_bk, cand, ok_bkn, pos_bkn):
    """Append the admitted candidates (in order) to the global store; on overflow keep the top scores.

    glob: (k, v, pos, score) of one layer [B, K, C, ...]; cand: (k, v, score) [B, K, N, ...].
    """
    g_k, g_v, g_pos, g_score = glob
    c_k, c_v, c_score = cand
    cap = g_k.shape[2]
    n_ok_bk = jnp.sum(ok_bkn, axis=-1, dtype=jnp.int32)
    fits = jnp.all(length_bk + n_ok_bk <= cap)

    def append(_):
        dest_bkn = jnp.where(ok_bkn, length_bk[..., None] + jnp.cumsum(ok_bkn, axis=-1) - 1, cap)
        put = jax.vmap(jax.vmap(lambda x, i, y: x.at[i].set(y, mode="drop")))
        return (
            put(g_k, dest_bkn, c_k.astype(g_k.dtype)),
            put(g_v, dest_bkn, c_v.astype(g_v.dtype)),
            put(g_pos, dest_bkn, pos_bkn),
            put(g_score, dest_bkn, c_score),
            length_bk + n_ok_bk,
            evicted_bk,
        )

    def keep_top(_):  # stored U admitted candidates -> the `cap` best scores, in original order
        slot_c = jnp.arange(cap)
        s_all = jnp.concatenate(
            [jnp.where(slot_c < length_bk[..., None], g_score, -jnp.inf), jnp.where(ok_bkn, c_score, -jnp.inf)], -1
        )
        _, top = jax.lax.top_k(s_all, cap)
        valid = jnp.take_along_axis(s_all, top, axis=-1) > -jnp.inf
        order = jnp.sort(jnp.where(valid, top, top + s_all.shape[-1]), axis=-1) % s_all.shape[-1]
        valid = jnp.take_along_axis(s_all, order, axis=-1) > -jnp.inf

        def pick(stored, new):
            both = jnp.concatenate([stored, new.astype(stored.dtype)], axis=2)
            idx = order.reshape(order.shape + (1,) * (both.ndim - 3))
            return jnp.take_along_axis(both, idx, axis=2)

        new_len = jnp.sum(valid, axis=-1, dtype=jnp.int32)
        return (
            pick(g_k, c_k),
            pick(g_v, c_v),
            jnp.where(valid, pick(g_pos, pos_bkn), -1),
            pick(g_score, c_score),
            new_len,
            evicted_bk + length_bk + n_ok_bk - new_len,
        )

    return jax.lax.cond(fits, append, keep_top, None)


@dataclasses.dataclass(frozen=True)
class DualAttend:
    """`Attend` hook running a chunk (T >= 1 tokens of contiguous positions per row) on a DualCache.

    `defer_gating` (decode only, T == 1): the new token's gate is not computed; the whole ring is
    gated once its slot W - 1 is written, before any of those tokens can leave the window.
    """

    admission: Admission
    defer_gating: bool = False

    def __call__(self, cache: DualCache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        b, t, k = q_btkgd.shape[:3]
        w, cap = cache.window, cache.capacity
        c0_b = pos_bt[:, 0]
        lay = lambda x: x[layer]  # noqa: E731
        ring_k, ring_v, ring_admit, ring_score = map(
            lay, (cache.ring_k, cache.ring_v, cache.ring_admit, cache.ring_score)
        )
        glob = tuple(map(lay, (cache.glob_k, cache.glob_v, cache.glob_pos, cache.glob_score)))
        length_bk, evicted_bk = cache.length[layer], cache.evicted[layer]
        k_bkte, v_bkte = jnp.swapaxes(k_btke, 1, 2), jnp.swapaxes(v_btke, 1, 2)

        defer = self.defer_gating and t == 1
        if defer:
            admit_bkt = jnp.zeros((b, k, t), bool)
            score_bkt = jnp.zeros((b, k, t), jnp.float32)
        else:
            admit_bkt, score_bkt = self.admission(layer, p, k_pre_btke, k_btke, v_btke, pos_bt)
        admit_bkt = admit_bkt & (pos_bt >= 0)[:, None, :]

        # 1. attention over [ring; global; chunk]
        slot_w = jnp.arange(w)
        ring_pos_bw = c0_b[:, None] - w + jnp.mod(slot_w[None, :] - c0_b[:, None], w)
        q_pos_bt = pos_bt
        dist_btw = q_pos_bt[:, :, None] - ring_pos_bw[:, None, :]
        ring_mask = (ring_pos_bw >= 0)[:, None, None, :] & (
            (dist_btw < w)[:, None] | ring_admit[:, :, None, :]
        )  # [B, K, T, W]
        glob_mask = jnp.broadcast_to(
            (jnp.arange(cap)[None, None, :] < length_bk[..., None])[:, :, None, :], (b, k, t, cap)
        )
        i_t, j_t = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        self_mask = ((j_t <= i_t)[None, None] & (((i_t - j_t) < w)[None, None] | admit_bkt[:, :, None, :])) & (
            pos_bt >= 0
        )[:, None, None, :]
        out = parts_attention(
            q_btkgd,
            [(ring_k, ring_v, ring_mask), (glob[0], glob[1], glob_mask), (k_bkte, v_bkte, self_mask)],
        )

        # 2. promote the tokens leaving the window: positions c0 - W + n, n < T
        n_ring = min(t, w)
        leave_pos_bn = c0_b[:, None] - w + jnp.arange(t)[None, :]
        slots_bn = jnp.mod(leave_pos_bn[:, :n_ring], w)
        cand_k, cand_v = _gather_slots(ring_k, slots_bn), _gather_slots(ring_v, slots_bn)
        cand_admit, cand_score = _gather_slots(ring_admit, slots_bn), _gather_slots(ring_score, slots_bn)
        if t > w:  # chunk tokens that are already out of the window when the chunk ends
            cand_k = jnp.concatenate([cand_k, k_bkte[:, :, : t - w]], axis=2)
            cand_v = jnp.concatenate([cand_v, v_bkte[:, :, : t - w]], axis=2)
            cand_admit = jnp.concatenate([cand_admit, admit_bkt[:, :, : t - w]], axis=2)
            cand_score = jnp.concatenate([cand_score, score_bkt[:, :, : t - w]], axis=2)
        ok_bkn = cand_admit & (leave_pos_bn >= 0)[:, None, :]
        pos_bkn = jnp.broadcast_to(leave_pos_bn[:, None, :], ok_bkn.shape)
        g_k, g_v, g_pos, g_score, length_bk, evicted_bk = _promote(
            glob, length_bk, evicted_bk, (cand_k, cand_v, cand_score), ok_bkn, pos_bkn
        )

        # 3. the chunk's last min(T, W) tokens enter the ring
        keep = slice(t - n_ring, t)
        new_slots_bn = jnp.mod(pos_bt[:, keep], w)
        ring_k = _scatter_slots(ring_k, new_slots_bn, k_bkte[:, :, keep].astype(ring_k.dtype))
        ring_v = _scatter_slots(ring_v, new_slots_bn, v_bkte[:, :, keep].astype(ring_v.dtype))
        ring_admit = _scatter_slots(ring_admit, new_slots_bn, admit_bkt[:, :, keep])
        ring_score = _scatter_slots(ring_score, new_slots_bn, score_bkt[:, :, keep])
        ring_kpre = cache.ring_kpre
        if cache.ring_kpre.shape[3]:  # deferred gating keeps the pre-RoPE keys
            kpre_bkte = jnp.swapaxes(k_pre_btke, 1, 2)[:, :, keep]
            ring_kpre_l = _scatter_slots(ring_kpre[layer], new_slots_bn, kpre_bkte.astype(ring_kpre.dtype))
            if defer:
                ring_admit, ring_score = self._refresh(
                    layer, p, ring_kpre_l, ring_k, ring_v, ring_admit, ring_score, pos_bt[:, 0]
                )
            ring_kpre = ring_kpre.at[layer].set(ring_kpre_l)

        put = lambda full, x: full.at[layer].set(x)  # noqa: E731
        new = DualCache(
            ring_k=put(cache.ring_k, ring_k),
            ring_v=put(cache.ring_v, ring_v),
            ring_kpre=ring_kpre,
            ring_admit=put(cache.ring_admit, ring_admit),
            ring_score=put(cache.ring_score, ring_score),
            glob_k=put(cache.glob_k, g_k),
            glob_v=put(cache.glob_v, g_v),
            glob_pos=put(cache.glob_pos, g_pos),
            glob_score=put(cache.glob_score, g_score),
            length=put(cache.length, length_bk),
            evicted=put(cache.evicted, evicted_bk),
        )
        return out.astype(v_btke.dtype), new

    def _refresh(self, layer, p, kpre_bkwe, k_bkwe, v_bkwe, admit_bkw, score_bkw, pos_b):
        """Gate the whole ring of the rows whose newest token sits in slot W - 1."""
        w = k_bkwe.shape[2]
        due_b = jnp.mod(pos_b, w) == w - 1

        def run(_):
            ring_pos_bw = pos_b[:, None] - w + 1 + jnp.arange(w)[None, :]  # slot s holds pos - W + 1 + s
            swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
            a, s = self.admission(layer, p, swap(kpre_bkwe), swap(k_bkwe), swap(v_bkwe), ring_pos_bw)
            a = a & (ring_pos_bw >= 0)[:, None, :]
            return jnp.where(due_b[:, None, None], a, admit_bkw), jnp.where(due_b[:, None, None], s, score_bkw)

        return jax.lax.cond(jnp.any(due_b), run, lambda _: (admit_bkw, score_bkw), None)


def stored_entries(cache: DualCache, seen_b) -> jax.Array:
    """KV entries actually held per [L, B, K]: the occupied ring slots plus the used global slots."""
    return jnp.minimum(jnp.asarray(seen_b), cache.window)[None, :, None] + cache.length
