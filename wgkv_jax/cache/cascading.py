"""Cascading KV cache (Willette et al., arXiv 2406.17808, ICLR 2025) with static shapes.

Per layer, row and KV head the cache holds S sink slots (the first S tokens, forever) and C
cascades, each a circular buffer of W slots. A new token enters cascade 0; a cascade that
*accepts* at the token's step appends it, or, when full, replaces its oldest token, which moves
on to the next cascade (popped from the last one, it leaves the cache). A cascade that
*declines* keeps only the better of the candidate and its newest token, by an attention EMA.
Cascade i accepts every 2^i steps ("pow2"), so the cascades span W * (2^C - 1) tokens with
C * W slots (the paper's "exponential extension"). See reference/baselines.md section 4.

Slot layout of one (layer, row, KV head), N = S + C * W::

    slot   0 .. S-1  | S .. S+W-1      | S+W .. S+2W-1   | ... | S+(C-1)W .. N-1
           sinks     | cascade 0       | cascade 1       | ... | cascade C-1
                     | newest tokens   |                 |     | oldest tokens

    cascade i, circular:  physical slot r (0..W-1) has age rank a = (r - start_i) mod W,
                          valid iff a < fill_i; a = 0 is the oldest token of the cascade.

    In-cache positions (paper default): sinks 0..S-1, then cascades from the oldest (C-1) to
    the newest (0), each in age order:  cascade i slot of rank a -> S + sum_{j>i} fill_j + a.
    The chunk's valid queries/keys get S + F + u (F = sum_i fill_i, u = index among valid).

Keys are stored before RoPE and rotated at every read with their current slot position.
The accept/decline decisions depend only on each row's token count and fills, never on scores
(paper section 4.2 "layout is head-independent"), so `start`/`fill` are per row, shared by heads;
only slot contents (overwrites) differ per head.

Paper vs ours: the acceptance rule, the EMA (section 4.3), sinks and both position modes are
the paper's (as in its official Triton code). Ours: a jnp `lax.scan` instead of the Triton
kernel, explicit attention probabilities (no fused EMA flash kernel; a [B, T, K, G, N + T]
score tensor per call), per-row pointers so left-padded rows of different lengths batch
together, and the eager-fill window "fewer than N_cap non-sink tokens seen" taken literally
from the spec (the official kernel's bound is off by one token from it).

Axis letters: l layer, b batch, k KV head, g group, n cache slot, t/u/s chunk time, e head dim,
c cascade.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from wgkv_jax.attention.reference import NEG_INF
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import apply_rope, rope_inv_freq

POSITION_MODES = ("in_cache", "original")
HEAD_REDUCTIONS = ("max", "mean")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
    """Static sizes and rules of a cascading cache (hashable: a jit static argument).

    Attributes:
      window: W, slots per cascade.
      cascades: C, the number of cascades (C = 1 is StreamingLLM: sinks + a W-token window).
      sinks: S, slots for the first S tokens of every row (kept forever; 0 allowed).
      beta: EMA decay of the attention score. 0.9999999 is the official code's current value
        ("adjusted up ... due to EMA bug in flash attention"); paper v1 used 0.9999.
      positions: "in_cache" (paper default: RoPE positions are the slots' ranks in the cache,
        sinks 0..S-1, cascade slots S..S+F-1 oldest first, queries S+F+u) or "original" (the
        tokens' absolute positions; the code's `do_og_pos`).
      head_reduce: how the G query heads of a KV group reduce their attention probabilities
        into one score per key ("max", as in all the paper's scripts, or "mean").
      eager_fill: every cascade accepts while fewer than C * W non-sink tokens have been seen,
        so the cache fills completely before the pow2 schedule starts (the paper's default).
    """

    window: int
    cascades: int = 4
    sinks: int = 4
    beta: float = 0.9999999
    positions: str = "in_cache"
    head_reduce: str = "max"
    eager_fill: bool = True

    def __post_init__(self):
        for name, low in (("window", 1), ("cascades", 1), ("sinks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CascadeConfig.{name}={value!r} must be an int >= {low}")
        if self.cascades > 30:
            raise ValueError(f"CascadeConfig.cascades={self.cascades} is too large (accept period 2^C overflows int32)")
        if not (isinstance(self.beta, float | int) and 0.0 < self.beta < 1.0):
            raise ValueError(f"CascadeConfig.beta={self.beta!r} must be a float in (0, 1)")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"CascadeConfig.positions={self.positions!r}; expected one of {POSITION_MODES}")
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"CascadeConfig.head_reduce={self.head_reduce!r}; expected one of {HEAD_REDUCTIONS}")
        if not isinstance(self.eager_fill, bool):
            raise ValueError(f"CascadeConfig.eager_fill={self.eager_fill!r} must be a bool")

    @property
    def cascade_slots(self) -> int:
        """N_cap = C * W, the non-sink slots."""
        return self.cascades * self.window

    @property
    def capacity(self) -> int:
        """N = S + C * W, slots per (layer, row, KV head)."""
        return self.sinks + self.cascade_slots

    @property
    def span(self) -> int:
        """W * (2^C - 1): the past non-sink tokens the cascades cover in steady state."""
        return self.window * (2**self.cascades - 1)

    @classmethod
    def for_budget(cls, tokens: int, *, cascades: int = 4, sinks: int = 4, **kw) -> CascadeConfig:
        """The largest window W with S + C * W <= `tokens` slots."""
        window = (tokens - sinks) // cascades
        if window < 1:
            raise ValueError(
                f"a budget of {tokens} slots cannot hold {sinks} sinks and {cascades} cascades of at least one "
                f"slot; need tokens >= {sinks + cascades}"
            )
        return cls(window=window, cascades=cascades, sinks=sinks, **kw)


# ----------------------------------------------------------------------------- cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CascadingCache:
    """All layers' cascading caches. A one-layer view (`layer(l)`) has the same fields without
    the leading L axis; `push` works on such views."""

    k: jax.Array  # [L, B, K, N, E] keys before RoPE
    v: jax.Array  # [L, B, K, N, E]
    pos: jax.Array  # [L, B, K, N] int32 original absolute position, -1 = empty
    score: jax.Array  # [L, B, K, N] float32 attention EMA (unused on sinks)
    start: jax.Array  # [L, B, C] int32 physical slot of each cascade's oldest token
    fill: jax.Array  # [L, B, C] int32 tokens held by each cascade
    seen: jax.Array  # [L, B] int32 valid tokens pushed so far (sinks included)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, ccfg: CascadeConfig, dtype=jnp.float32) -> CascadingCache:
        lbk = (cfg.n_layers, batch, cfg.n_kv_heads)
        kv = (*lbk, ccfg.capacity, cfg.head_dim)
        return cls(
            k=jnp.zeros(kv, dtype),
            v=jnp.zeros(kv, dtype),
            pos=jnp.full((*lbk, ccfg.capacity), -1, jnp.int32),
            score=jnp.zeros((*lbk, ccfg.capacity), jnp.float32),
            start=jnp.zeros((cfg.n_layers, batch, ccfg.cascades), jnp.int32),
            fill=jnp.zeros((cfg.n_layers, batch, ccfg.cascades), jnp.int32),
            seen=jnp.zeros((cfg.n_layers, batch), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.k.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def kv_nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def logical_axes() -> CascadingCache:
        kv = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
        slots = ("layers", "batch", "kv_heads", "cache_seq")
        rows = ("layers", "batch", None)
        return CascadingCache(kv, kv, slots, slots, rows, rows, ("layers", "batch"))

    def layer(self, layer) -> CascadingCache:
        """One layer's view (traced `layer` is fine: a dynamic slice)."""
        return jax.tree.map(lambda x: x[layer], self)

    def with_layer(self, layer, view: CascadingCache) -> CascadingCache:
        """This cache with layer `layer` replaced by the one-layer `view`."""
        return jax.tree.map(
            lambda full, new: jax.lax.dynamic_update_index_in_dim(full, new.astype(full.dtype), layer, 0), self, view
        )


def slot_positions(start, fill, ccfg: CascadeConfig, seen=None) -> jax.Array:
    """In-cache RoPE position of every slot, [..., N] int32, -1 for an empty slot.

    start, fill: int [..., C]. seen: int [...] tokens pushed (sinks included); without it every
    sink counts as filled (true once any cascade holds a token). See the module diagram.
    """
    s, w, c = ccfg.sinks, ccfg.window, ccfg.cascades
    r_w = jnp.arange(w, dtype=jnp.int32)
    # tokens in the cascades older than cascade i: sum of fills of cascades i+1 .. C-1
    older_c = jnp.cumsum(fill[..., ::-1], axis=-1)[..., ::-1] - fill
    rank_cw = (r_w - start[..., None]) % w
    cas_cw = jnp.where(rank_cw < fill[..., None], s + older_c[..., None] + rank_cw, -1)
    sink_s = jnp.arange(s, dtype=jnp.int32)
    if seen is None:
        sinks = jnp.broadcast_to(sink_s, (*start.shape[:-1], s))
    else:
        sinks = jnp.where(sink_s < seen[..., None], sink_s, -1)
    return jnp.concatenate([sinks, cas_cw.reshape((*start.shape[:-1], c * w))], axis=-1).astype(jnp.int32)


def query_positions(view: CascadingCache, pos_bt, ccfg: CascadeConfig) -> jax.Array:
    """In-cache RoPE positions [B, T] of a chunk read against one layer's view: S' + F + u for the
    u-th valid token (S' = sinks filled, F = sum of fills); pads keep their (negative) pos_bt.
    The largest is S + C * W + T - 1, whatever the stream's length (invariant C11)."""
    valid_bt = pos_bt >= 0
    stored_b = jnp.minimum(view.seen, ccfg.sinks) + jnp.sum(view.fill, axis=-1)
    rank_bt = jnp.cumsum(valid_bt.astype(jnp.int32), axis=1) - 1
    return jnp.where(valid_bt, stored_b[:, None] + rank_bt, pos_bt).astype(jnp.int32)


# ----------------------------------------------------------------------------- acceptance rule


def _push_one(view: CascadingCache, k_bke, v_bke, s_bk, p_b, ccfg: CascadeConfig) -> CascadingCache:
    """The acceptance rule (section 4.2) for one token per row; p_b < 0 marks a pad (skipped).

    The decisions (which cascade accepts, appends, evicts or compares) depend only on each row's
    counters, so they are worked out first; then every slot the token touches (its sink, and one
    slot per cascade: the append / evict / compare target) is read in ONE gather and written in
    ONE scatter. The chain is consistent because each cascade's slot is read before any write and
    a popped token only ever moves into the next cascade's (distinct) slot.
    """
    s, w, n_c = ccfg.sinks, ccfg.window, ccfg.cascades
    b, k = s_bk.shape
    valid_b = p_b >= 0
    seen_b = view.seen
    sink_b = valid_b & (seen_b < s) if s > 0 else jnp.zeros_like(valid_b)
    go_b = valid_b & ~sink_b
    t_b = seen_b - s  # index of the token among non-sink tokens
    eager_b = jnp.full_like(valid_b, ccfg.eager_fill) & (t_b < ccfg.cascade_slots)
    slots, writes, compares, appends, evicts = [], [], [], [], []
    for i in range(n_c):  # static unroll over scalars per row; `go_b`: the candidate reached cascade i
        st_b, f_b = view.start[:, i], view.fill[:, i]
        accept_b = eager_b | (t_b % (2**i) == 0)
        evict_b = go_b & accept_b & (f_b >= w)
        append_b = go_b & ((accept_b & (f_b < w)) | (~accept_b & (f_b == 0)))
        compare_b = go_b & ~accept_b & (f_b > 0)
        # append -> first free slot; evict -> the oldest; compare -> the newest, (start + fill - 1) mod W
        r_b = jnp.where(evict_b, st_b, jnp.where(append_b, st_b + f_b, st_b + f_b - 1)) % w
        slots.append(s + i * w + r_b)
        writes.append(evict_b | append_b)
        compares.append(compare_b)
        appends.append(append_b)
        evicts.append(evict_b)
        go_b = evict_b  # the popped token moves on (dropped after the last cascade)
    if s > 0:  # the sink slot rides along as entry 0 (written only while the row fills its sinks)
        slots.insert(0, jnp.minimum(seen_b, s - 1))
        writes.insert(0, sink_b)
        compares.insert(0, jnp.zeros_like(sink_b))
    slot_bj = jnp.stack(slots, axis=-1)  # [B, J], J = C (+ 1 sink); distinct slots per row
    idx = (jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], slot_bj[:, None, :])
    old = tuple(x[idx] for x in (view.k, view.v, view.score, view.pos))  # [B, K, J, ...]
    new = (k_bke, v_bke, s_bk.astype(jnp.float32), jnp.broadcast_to(p_b[:, None], (b, k)).astype(jnp.int32))
    first = 1 if s > 0 else 0  # the sink's candidate is the new token too
    cand = tuple(
        jnp.concatenate(
            [jnp.repeat(nx[:, :, None].astype(ox.dtype), first + 1, axis=2), ox[:, :, first : first + n_c - 1]],
            axis=2,
        )
        for nx, ox in zip(new, old, strict=True)
    )  # cascade i's candidate: the new token (i = 0), else what cascade i - 1 popped
    if s > 0:  # sinks carry no score
        cand = (cand[0], cand[1], cand[2].at[:, :, 0].set(0.0), cand[3])
    # C12: on a decline the candidate replaces the newest resident iff its score is >= (ties: newer wins)
    write_bkj = jnp.stack(writes, -1)[:, None, :] | (jnp.stack(compares, -1)[:, None, :] & (cand[2] >= old[2]))
    put = []
    for x, c, o in zip((view.k, view.v, view.score, view.pos), cand, old, strict=True):
        mask = write_bkj.reshape(write_bkj.shape + (1,) * (o.ndim - 3))
        put.append(x.at[idx].set(jnp.where(mask, c, o)))
    fill = view.fill + jnp.stack(appends, axis=-1).astype(jnp.int32)
    start = jnp.where(jnp.stack(evicts, axis=-1), (view.start + 1) % w, view.start)
    return dataclasses.replace(
        view, k=put[0], v=put[1], score=put[2], pos=put[3], start=start, fill=fill,
        seen=seen_b + valid_b.astype(jnp.int32),
    )  # fmt: skip


def push(view: CascadingCache, k_btke, v_btke, score_btk, pos_bt, ccfg: CascadeConfig) -> CascadingCache:
    """Push a chunk of tokens through the acceptance rule, in order, on one layer's view.

    Args:
      view: one layer's cache (`CascadingCache.layer`): k, v [B, K, N, E], pos/score [B, K, N],
        start/fill [B, C], seen [B].
      k_btke: keys before RoPE; v_btke: values; score_btk: the new tokens' EMA scores (float);
      pos_bt: int32 original positions, < 0 for pads (not written, not counted).
    Returns:
      the updated view. The first S valid tokens of a row fill its sinks.
    """
    with jax.named_scope("cascade_push"):
        if k_btke.shape[1] == 1:
            return _push_one(view, k_btke[:, 0], v_btke[:, 0], score_btk[:, 0], pos_bt[:, 0], ccfg)

        def step(carry, xs):
            return _push_one(carry, *xs, ccfg), None

        xs = tuple(jnp.swapaxes(x, 0, 1) for x in (k_btke, v_btke, score_btk, pos_bt))
        view, _ = jax.lax.scan(step, view, xs)
        return view


# ----------------------------------------------------------------------------- EMA (section 4.3)


def ema_weights(valid_bt, beta: float):
    """(decay_b, w_bt, w_btu): the chunk's EMA weights for q_b valid queries of each row.

    decay_b = beta^q_b; w_bt = (1 - beta) beta^(q_b - 1 - c_t) for an existing slot, c_t the
    query's index among valid ones; w_btu[b, t, u] = (1 - beta) beta^(c_t - c_u) for a new token
    u read by query t >= u (both valid): weights relative to the token's own arrival.
    Powers are exp(n * log beta) with log beta in float64, so beta = 0.9999999 survives float32.
    """
    log_beta = math.log(beta)
    one_minus = 1.0 - beta
    c_bt = jnp.cumsum(valid_bt.astype(jnp.int32), axis=1) - 1
    q_b = jnp.sum(valid_bt.astype(jnp.int32), axis=1)
    decay_b = jnp.exp(q_b.astype(jnp.float32) * log_beta)
    w_bt = jnp.where(valid_bt, one_minus * jnp.exp((q_b[:, None] - 1 - c_bt).astype(jnp.float32) * log_beta), 0.0)
    lag_btu = (c_bt[:, :, None] - c_bt[:, None, :]).astype(jnp.float32)
    t = valid_bt.shape[1]
    causal_tu = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    both_btu = valid_bt[:, :, None] & valid_bt[:, None, :] & causal_tu
    w_btu = jnp.where(both_btu, one_minus * jnp.exp(lag_btu * log_beta), 0.0)
    return decay_b, w_bt, w_btu


def ema_update(score_bkn, abar_btkn, abar_btku, valid_bt, beta: float):
    """Section 4.3: (updated scores of the existing slots [B, K, N], the new tokens' scores [B, T, K]).

    abar_btkn: reduced attention probabilities of the chunk's queries over the cache slots;
    abar_btku: over the chunk's own tokens (key axis u). Pads (valid_bt False) weigh nothing.
    """
    decay_b, w_bt, w_btu = ema_weights(valid_bt, beta)
    score_bkn = decay_b[:, None, None] * score_bkn + jnp.einsum("bt,btkn->bkn", w_bt, abar_btkn)
    new_buk = jnp.einsum("btu,btku->buk", w_btu, abar_btku)
    return score_bkn, new_buk


# ----------------------------------------------------------------------------- attention hook


def _rotate_slots(k_bkne, pos_bn_or_bkn, inv_freq):
    """RoPE on stored keys [B, K, N, E] at per-slot positions [B, N] (shared by heads) or [B, K, N]."""
    b, k, n, e = k_bkne.shape
    if pos_bn_or_bkn.ndim == 2:
        return jnp.swapaxes(apply_rope(jnp.swapaxes(k_bkne, 1, 2), pos_bn_or_bkn, inv_freq), 1, 2)
    flat = apply_rope(k_bkne.reshape(b, k * n, e), pos_bn_or_bkn.reshape(b, k * n), inv_freq)
    return flat.reshape(b, k, n, e)


@dataclasses.dataclass(frozen=True)
class CascadeAttend:
    """`Attend` hook of the cascading cache; the same object serves prefill chunks and decode.

    One call (T >= 1 tokens per row): the chunk's queries attend to [sinks; valid cascade slots;
    the chunk itself, causally]; the slots' EMA scores are updated and the new tokens' scores
    computed (section 4.3); then the chunk's tokens are pushed through the acceptance rule.
    Pads (pos < 0) neither attend usefully, nor are attended to, nor are written.
    """

    ccfg: CascadeConfig
    cfg: ModelConfig

    def __call__(self, cache: CascadingCache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        del p
        ccfg = self.ccfg
        view = cache.layer(layer)
        inv_freq = rope_inv_freq(self.cfg)
        valid_bt = pos_bt >= 0
        slot_ok_bkn = view.pos >= 0
        with jax.named_scope("cascade_positions"):
            if ccfg.positions == "in_cache":
                slot_pos_bn = slot_positions(view.start, view.fill, ccfg, view.seen)
                new_pos_bt = query_positions(view, pos_bt, ccfg)
                # q arrives rotated by pos_bt; RoPE rotations compose, so rotate by the difference
                q_btkgd = apply_rope(q_btkgd, new_pos_bt - pos_bt, inv_freq)
                k_btke = apply_rope(k_pre_btke, new_pos_bt, inv_freq)
                kc_bkne = _rotate_slots(view.k, slot_pos_bn, inv_freq)
            else:
                kc_bkne = _rotate_slots(view.k, view.pos, inv_freq)
        with jax.named_scope("cascade_attention"):
            e = q_btkgd.shape[-1]
            qf = q_btkgd.astype(jnp.float32) * e**-0.5
            s_cache = jnp.einsum("btkge,bkne->btkgn", qf, kc_bkne.astype(jnp.float32))
            s_self = jnp.einsum("btkge,bske->btkgs", qf, k_btke.astype(jnp.float32))
            self_ok_bts = valid_bt[:, None, :] & (pos_bt[:, None, :] <= pos_bt[:, :, None])
            s_cache = jnp.where(slot_ok_bkn[:, None, :, None, :], s_cache, NEG_INF)
            s_self = jnp.where(self_ok_bts[:, :, None, None, :], s_self, NEG_INF)
            n = s_cache.shape[-1]
            p_all = jax.nn.softmax(jnp.concatenate([s_cache, s_self], axis=-1), axis=-1)
            p_cache, p_self = p_all[..., :n], p_all[..., n:]
            out = jnp.einsum("btkgn,bkne->btkge", p_cache, view.v.astype(jnp.float32))
            out = out + jnp.einsum("btkgs,bske->btkge", p_self, v_btke.astype(jnp.float32))
        with jax.named_scope("cascade_ema"):
            reduce = jnp.max if ccfg.head_reduce == "max" else jnp.mean
            abar_all = reduce(p_all, axis=3)  # [B, T, K, N + T]
            score_bkn, new_btk = ema_update(view.score, abar_all[..., :n], abar_all[..., n:], valid_bt, ccfg.beta)
            view = dataclasses.replace(view, score=score_bkn)
        with jax.named_scope("cache_update"):
            view = push(view, k_pre_btke, v_btke, new_btk, pos_bt, ccfg)
        return out.astype(v_btke.dtype), cache.with_layer(layer, view)
