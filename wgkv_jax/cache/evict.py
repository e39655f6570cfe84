"""Eviction on the WG-KV dual cache: admission at write time, then a policy chooses what stays.

    write (gate)  ->  global store  ->  score (policy)  ->  select (budget)  ->  compact (smaller C)

After the prompt is prefilled, an eviction policy (`wgkv_jax.policies`) scores the global store's
entries and the store is compacted into a smaller static capacity, so the memory saved is real
(the decode step runs on the smaller buffers). The local ring (the last W tokens) is never evicted:
it is the recent window every policy protects anyway.

Where the scores come from:

- window policies (SnapKV, H2O, StreamingLLM, AhaKV, `Chain`s of them): `ScoreAttend` wraps the
  prefill hook of the LAST prompt chunk; after the chunk's normal attention it scores, per layer,
  the store plus the in-window ring entries with that chunk's queries (the observation window is
  the prompt's last queries, since rows are left-padded to end together). H2O thus accumulates
  over the last chunk's queries only (all of them when the chunk covers the prompt; ours).
- KVzip: `kvzip_pass` runs KVzip's repeat passes ("Repeat the previous context exactly." + each
  context chunk, teacher-forced) with `KVzipAttend`, which reads the cache without writing it and
  keeps, per store entry, the max attention of any repeat query over the reduced key set (sinks,
  the chunk's own entries, the repeat input); reference/baselines.md section 2.2.

Budgets: the policy's own (`PerHead`, `PerLayer`, `Global`, `Threshold`) over the store. A
`KeepRatio(r)` is taken as a fraction of the whole prompt's KV (what a user compares at "equal
memory"): the store keeps floor(r * n) - W entries per head, W of the r * n being the ring
(`store_policy`). Ragged per-head counts (PerLayer, Global, Threshold) are compacted into the
largest head's count, so their saving is partial (reference/baselines.md 1.3, option 2).

Axis letters: l layer, b batch, k KV head, c global slot, r ring slot, t time, g query head in a
GQA group, e head dim, n key slot (parts concatenated).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from wgkv_jax import policies as P
from wgkv_jax.attention.reference import NEG_INF
from wgkv_jax.cache.dual import DualAttend, DualCache
from wgkv_jax.cache.per_layer import PerLayerCache
from wgkv_jax.policies.budgets import KeepRatio, Threshold, Tokens
from wgkv_jax.policies.scores import visible

KVZIP_FIRST = "\n\nRepeat the previous context exactly."
KVZIP_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "


def ring_entries(cache: DualCache, layer, end_b):
    """The ring's in-window entries of one layer after a chunk ending at end_b (exclusive):
    (k [B, K, R, E], v, pos [B, K, R], valid [B, K, R]); positions end - W .. end - 1."""
    r, (b, k) = cache.ring_size, cache.ring_admit.shape[1:3]
    pos_br = end_b[:, None] - r + jnp.mod(jnp.arange(r)[None, :] - end_b[:, None], r)
    valid_br = (pos_br >= 0) & (pos_br >= end_b[:, None] - cache.window)
    pos_bkr = jnp.broadcast_to(pos_br[:, None], (b, k, r))
    return cache.ring_k[layer], cache.ring_v[layer], pos_bkr, jnp.broadcast_to(valid_br[:, None], (b, k, r))


def store_entries(cache: DualCache, layer):
    """The global store of one layer: (k [B, K, C, E], v, pos [B, K, C], valid [B, K, C])."""
    valid = jnp.arange(cache.capacity) < cache.length[layer][..., None]
    return cache.glob_k[layer], cache.glob_v[layer], cache.glob_pos[layer], valid


def _cat(*parts):
    return tuple(jnp.concatenate(xs, axis=2) for xs in zip(*parts, strict=True))


@dataclasses.dataclass(frozen=True)
class ScoreAttend:
    """Prefill hook of the last chunk: `inner` (a DualAttend) as usual, then `policy` scores this
    layer's store, with the ring's in-window entries beside it so the softmax sees every key a
    query of the chunk can read. State: (DualCache, scores [L, B, K, C])."""

    inner: DualAttend
    policy: P.Policy

    def __call__(self, state, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        cache, score_lbkc = state
        out, cache = self.inner(cache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt)
        k, v, pos, valid = _cat(store_entries(cache, layer), ring_entries(cache, layer, pos_bt[:, -1] + 1))
        s_bkn = self.policy.score(pos=pos, valid=valid, k=k, v=v, q=q_btkgd, q_pos=pos_bt)
        return out, (cache, score_lbkc.at[layer].set(s_bkn[..., : cache.capacity]))


@dataclasses.dataclass(frozen=True)
class KVzipAttend:
    """Hook of a KVzip repeat pass; reads the cache, never writes it.

    State: (DualCache, scores [L, B, K, C], lo_b, hi_b, end_b): the context chunk [lo, hi) being
    reconstructed and the context end (the repeat tokens sit at positions end, end + 1, ...).
    The layer's output is attention over the whole cache (store + in-window ring) and the repeat
    input itself (causal); the score of a store entry in [lo, hi) is the max, over the repeat
    queries and the G heads of its group, of the softmax over the reduced set (positions <
    `sinks`, the chunk's entries, the repeat input), max-accumulated into the scores.
    """

    sinks: int = 4

    def __call__(self, state, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        del p, k_pre_btke
        cache, score_lbkc, lo_b, hi_b, end_b = state
        b, t, kh = q_btkgd.shape[:3]
        mine_bkt = jnp.broadcast_to((pos_bt >= 0)[:, None], (b, kh, t))
        pos_bkt = jnp.broadcast_to(pos_bt[:, None], (b, kh, t))
        me = (jnp.swapaxes(k_btke, 1, 2), jnp.swapaxes(v_btke, 1, 2), pos_bkt, mine_bkt)
        k, v, pos, valid = _cat(store_entries(cache, layer), ring_entries(cache, layer, end_b), me)
        # one set of logits, two softmaxes: the output over every key, the score over the reduced set
        e = q_btkgd.shape[-1]
        s_bkgtn = jnp.einsum(
            "btkge,bkne->bkgtn", q_btkgd, k.astype(q_btkgd.dtype), preferred_element_type=jnp.float32
        ) * (e**-0.5)
        span = lambda x: x[:, None, None]  # noqa: E731
        reduced = valid & ((pos < self.sinks) | ((pos >= span(lo_b)) & (pos < span(hi_b))))
        reduced = reduced.at[..., -t:].set(mine_bkt)

        def probs(keys_bkn):
            sees = visible(pos_bt, pos, keys_bkn)[:, :, None]
            return jnp.where(sees, jax.nn.softmax(jnp.where(sees, s_bkgtn, NEG_INF), axis=-1), 0.0)

        out = jnp.einsum("bkgtn,bkne->btkge", probs(valid).astype(v.dtype), v, preferred_element_type=jnp.float32)
        cap = cache.capacity
        s_bkc = jnp.max(probs(reduced)[..., :cap], axis=(2, 3))
        glob_pos = cache.glob_pos[layer]
        chunk_bkc = reduced[..., :cap] & (glob_pos >= span(lo_b))
        s_bkc = jnp.where(chunk_bkc, jnp.maximum(score_lbkc[layer], s_bkc), score_lbkc[layer])
        return out.astype(v_btke.dtype), (cache, score_lbkc.at[layer].set(s_bkc), lo_b, hi_b, end_b)


def kvzip_repeat_inputs(prompts, *, chunk: int, carry: int, first_ids, next_ids):
    """KVzip's repeat inputs for a batch of prompts (token ids): one batch per context chunk.

    Chunk i of row b covers context positions [i * chunk, (i + 1) * chunk) of that row; its input
    is first_ids (i = 0) or next_ids + the previous chunk's last `carry` tokens, then the chunk's
    own tokens (teacher-forced). Rows are left-padded to a power-of-two length (one compile per
    bucket); rows whose context is shorter get an empty input.

    Returns: list of (tokens [B, T] int32, offset [B] = index of the first real token, lo [B], hi [B]).
    """
    from wgkv_jax.infer.generate import prompt_bucket

    longest = max(len(p) for p in prompts)
    out = []
    for start in range(0, longest, chunk):
        rows, lo, hi = [], [], []
        for ids in prompts:
            if start >= len(ids):
                rows.append([])
                lo.append(0)
                hi.append(0)
                continue
            head = list(first_ids) if start == 0 else list(next_ids) + list(ids[max(start - carry, 0) : start])
            stop = min(start + chunk, len(ids))
            rows.append(head + list(ids[start:stop]))
            lo.append(start)
            hi.append(stop)
        t = prompt_bucket(max(len(r) for r in rows))
        tokens = np.zeros((len(rows), t), np.int32)
        offset = np.zeros(len(rows), np.int32)
        for i, r in enumerate(rows):
            offset[i] = t - len(r)
            tokens[i, offset[i] :] = r
        out.append((tokens, offset, np.asarray(lo, np.int32), np.asarray(hi, np.int32)))
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "attend"), donate_argnames=("state",))
def _repeat_pass(params, cfg, state, tokens_bt, pos_bt, attend):
    from wgkv_jax.model.transformer import hidden_states

    _, state = hidden_states(params, cfg, tokens_bt, pos_bt, attend=attend, state=state)
    return state


def kvzip_pass(params, cfg, cache: DualCache, prompts, policy: P.KVzip, *, first_ids, next_ids, put=None):
    """Score the store of a prefilled dual cache with KVzip's repeat passes; the cache is unchanged.

    prompts: the rows' token ids (the context that was prefilled). Returns (cache, scores [L, B, K, C]).
    """
    put = put or (lambda x, axes: jnp.asarray(x))
    end_b = np.asarray([len(p) for p in prompts], np.int32)
    score = jnp.zeros(cache.glob_pos.shape, jnp.float32)
    attend = KVzipAttend(sinks=policy.sinks)
    for tokens, offset, lo, hi in kvzip_repeat_inputs(
        prompts, chunk=policy.chunk, carry=policy.carry, first_ids=first_ids, next_ids=next_ids
    ):
        t = tokens.shape[1]
        idx = np.arange(t, dtype=np.int32)[None, :] - offset[:, None]
        pos = np.where(idx >= 0, end_b[:, None] + idx, -1).astype(np.int32)
        state = (cache, score, jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(end_b))
        tokens, pos = put(tokens, ("batch", "seq")), put(pos, ("batch", "seq"))
        cache, score, *_ = _repeat_pass(params, cfg, state, tokens, pos, attend)
    sink = (cache.glob_pos >= 0) & (cache.glob_pos < policy.sinks)
    return cache, jnp.where(sink, jnp.inf, score)


def kvzip_head_scores(params, cfg, texts, *, first_ids, next_ids, window: int = 64, chunk: int = 512, kvzip=None):
    """KVzip's head-level calibration: [L, K] float64, each KV head's largest KVzip score over the
    entries of each calibration text (sinks excluded), max-pooled over the texts (`texts`: token-id
    lists). Every text is prefilled into a dual cache that keeps everything, then scored by the
    repeat pass (`kvzip_pass`); feed the result to `policies.KVzipHeads(head_scores=...)`."""
    from wgkv_jax.cache.admission import FixedAdmission
    from wgkv_jax.cache.dual import CacheConfig
    from wgkv_jax.infer.generate import generate_ids

    kvzip = kvzip or P.KVzip(budget=P.Global(KeepRatio(1.0)))
    if not texts or any(len(t) == 0 for t in texts):
        raise ValueError("kvzip_head_scores needs at least one non-empty calibration text")
    best = None
    for ids in texts:
        cache = CacheConfig(window=window, chunk=chunk, capacity_fraction=1.0)
        _, _, stats = generate_ids(
            params, cfg, [list(ids)], max_new_tokens=1, cache=cache, admission=FixedAdmission("all"),
            return_cache=True,
        )  # fmt: skip
        state, score = kvzip_pass(
            params, cfg, stats["cache_state"], [list(ids)], kvzip, first_ids=first_ids, next_ids=next_ids
        )
        scored = (jnp.arange(state.capacity) < state.length[..., None]) & (state.glob_pos >= kvzip.sinks)
        head = np.asarray(jnp.max(jnp.where(scored, score, 0.0), axis=(1, 3)), np.float64)  # [L, K]
        best = head if best is None else np.maximum(best, head)
    return best


# ----------------------------------------------------------------------------- budgets and eviction


def _store_size(size, prompt_tokens: int, window: int):
    if not isinstance(size, KeepRatio):
        return size
    total = int(np.floor(size.ratio * prompt_tokens + 1e-9))
    local = min(window, prompt_tokens)
    if total <= local and size.ratio < 1.0:
        raise ValueError(
            f"keep ratio {size.ratio} keeps {total} of the {prompt_tokens}-token prompt's entries per head, no more "
            f"than the local window W={local} holds on its own; lower the window (CacheConfig.window) or raise it"
        )
    return Tokens(max(total - local, 1))


def store_policy(policy, prompt_tokens: int, window: int):
    """`policy` with KeepRatio budgets turned into the store's per-head Tokens (see the module doc)."""
    if isinstance(policy, P.Chain):
        stages = tuple(store_policy(s, prompt_tokens, window) if isinstance(s, P.Policy) else s for s in policy.stages)
        return P.Chain(stages)
    budget = policy.budget
    if isinstance(budget, Threshold) or (isinstance(policy, P.StreamingLLM) and policy.window is not None):
        return policy  # no size (a threshold), or sinks + window: nothing to translate
    size = _store_size(budget.size, prompt_tokens, window)
    return dataclasses.replace(policy, budget=dataclasses.replace(budget, size=size))


@functools.partial(jax.jit, static_argnames=("budget", "alive_only"))
def store_keep(cache: DualCache, score_lbkc, budget, alive_only: bool = False):
    """Keep mask [L, B, K, C] of `budget` over the store's scores (a Chain's -inf = not a survivor)."""
    valid = jnp.arange(cache.capacity) < cache.length[..., None]
    if alive_only:
        valid = valid & (score_lbkc > -jnp.inf)
    return P.select(score_lbkc, valid, None, budget)


@functools.partial(jax.jit, static_argnames=("c_out",))
def compact_store(cache: DualCache, keep_lbkc, c_out: int) -> DualCache:
    """The cache with its store compacted to the kept entries, in position order, in c_out slots."""
    k, v, pos, length, (score,) = P.compact(
        cache.glob_k, cache.glob_v, cache.glob_pos, keep_lbkc, c_out, (cache.glob_score,)
    )
    return dataclasses.replace(cache, glob_k=k, glob_v=v, glob_pos=pos, glob_score=score, length=length)


def evict(
    cache: DualCache, score_lbkc, policy, *, room: int, align: int = 16, per_layer: bool = False
) -> tuple[DualCache | PerLayerCache, np.ndarray]:
    """Apply `policy`'s budget to the store and compact it (one host sync for the ragged count).

    The new capacity is the largest per-head kept count plus `room` slots for the tokens decode
    will admit, rounded up to `align`: over the whole cache, or with `per_layer` over each layer
    (a `PerLayerCache`, for unrolled layers: a ragged budget's savings across layers are real).
    Returns (cache, entries dropped per layer [L]).
    """
    keep = store_keep(cache, score_lbkc, policy.budget, isinstance(policy, P.Chain))
    kept_lbk = np.asarray(jnp.sum(keep, axis=-1))
    before_lbk = np.asarray(cache.length)
    dropped_l = (before_lbk - kept_lbk).sum(axis=(1, 2))

    def size(kept: int) -> int:
        return -(-max(kept + room, 1) // align) * align

    if not per_layer:
        return compact_store(cache, keep, size(int(kept_lbk.max()))), dropped_l
    layers = PerLayerCache.split(cache).layers
    out = tuple(compact_store(one, keep[i : i + 1], size(int(kept_lbk[i].max()))) for i, one in enumerate(layers))
    return PerLayerCache(out), dropped_l
