"""Scoring functions of the eviction / selection baselines: pure jnp, jit-able, model-independent.

Every function takes plain arrays and returns float32 scores, higher = keep. Conventions shared by
all of them (ours, not the papers'; they make batches with padding and static buckets work):

- keys `k_bkne` [B, K, N, E] with absolute positions `pos_bkn` and a validity mask `valid_bkn`
  (False on padding and empty slots); invalid slots always score -inf.
- queries `q_btkge` [B, T, K, G, E] (the G query heads of KV head k) with positions `q_pos_bt`;
  a query with a negative position is padding and contributes nothing. Query t sees key n iff
  valid and pos[n] <= q_pos[t] (causal by position, so slot order does not matter).
- attention probabilities are softmax(q . k / sqrt(E)) in float32 over the keys the query sees.
- "the first s positions" means pos < s; "the last w positions" means pos > max(valid pos) - w,
  per (row, head). Protected entries score +inf (reference/baselines.md section 1.2).

What each computes (paper -> our reading where the paper leaves a detail open):

- `streaming_llm_scores` (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
  Sinks"): +inf on the first `sinks` positions (attention sinks, paper default 4) and the last
  `window`; -inf elsewhere, so a budget of sinks + window keeps exactly those. Ours: window=None
  scores the rest by recency (position), so any budget k keeps the sinks + the newest k - sinks.
  StreamingLLM re-rotates kept keys to in-cache positions; we keep the original positions.
- `snapkv_scores` (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
  Generation"; code FasterDecoding/SnapKV): the last `window` queries (the observation window)
  attend causally to all keys; each prefix key's attention is summed over the window queries,
  then 1-D pooled along the slot axis (stride 1, padding kernel // 2, over prefix keys only, as the
  code slices the window off before pooling); the window's own keys score +inf (always kept).
  Defaults follow the paper's experiments (configs `*_w32_k7_maxpool`): window 32, kernel 7,
  max pooling; the code's class default is avg pooling, kernel 5 (avg divides by the kernel size,
  zero padding counted, as torch's avg_pool1d). Ours: GQA (the paper is multi-head) sums the G
  query heads of a KV group (group="sum"); group="max" takes the max over them before summing
  over the window, which is the WG-KV integration's rule (mean over window of max over heads).
- `h2o_scores` (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle"): accumulated attention each key
  receives, summed over all given queries (and, ours, the G heads of the group); the last `recent`
  positions score +inf (H2O keeps heavy hitters + a recent window; its default splits the budget
  in half). The paper's decode-time greedy update is this sum carried on: `acc + h2o_scores(new
  query, recent=0)`, since each query's softmax is independent of the others.
- `kvzip_scores` (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
  Reconstruction"): per key, the max over the repeat-pass queries and the G heads of the group of
  the softmax probability over KVzip's reduced key set (the caller chooses that set: sinks, the
  context chunk and the repeat input); the first `sinks` positions score +inf.
- `quest_page_scores` (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context
  LLM Inference"; code mit-han-lab/Quest): keys are cut into pages of `page` slots (default 16);
  per page the channel-wise min and max of its keys; page score for query head q is
  sum_e max(q_e * min_e, q_e * max_e), the upper bound of q . k over the page, no 1/sqrt(E).
  One score per query head, as the code (which repeats KV heads). A page is eligible for a query iff
  it holds a valid key the query sees (as the code's causal mask before the page max); min/max
  run over all valid keys of the page. Ours: pages are consecutive slots of the given layout.

Axis letters: b batch, k KV head, g query head within a group, t query time, n/s key slot,
p page, e head dim.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from wgkv_jax.attention.reference import NEG_INF


def first_positions(pos_bkn: jax.Array, valid_bkn: jax.Array, n: int) -> jax.Array:
    """Valid slots holding one of the first n positions of the sequence (pos < n)."""
    return valid_bkn & (pos_bkn >= 0) & (pos_bkn < n)


def last_positions(pos_bkn: jax.Array, valid_bkn: jax.Array, n: int) -> jax.Array:
    """Valid slots holding one of the last n positions of their (row, head): pos > max pos - n."""
    top_bk1 = jnp.max(jnp.where(valid_bkn, pos_bkn, -1), axis=-1, keepdims=True)
    return valid_bkn & (pos_bkn > top_bk1 - n)


def visible(q_pos_bt: jax.Array, pos_bkn: jax.Array, valid_bkn: jax.Array) -> jax.Array:
    """[B, K, T, N]: query t sees key n (valid, pos[n] <= q_pos[t], and the query is no padding)."""
    return (
        valid_bkn[:, :, None, :]
        & (pos_bkn[:, :, None, :] <= q_pos_bt[:, None, :, None])
        & (q_pos_bt >= 0)[:, None, :, None]
    )


def attention_probs(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn) -> jax.Array:
    """Causal softmax attention of each query head over the keys it sees: float32 [B, K, G, T, N].

    Rows of padding queries (q_pos < 0) and columns of keys a query cannot see are exactly 0.
    """
    e = q_btkge.shape[-1]
    s_bkgtn = jnp.einsum(
        "btkge,bkne->bkgtn", q_btkge.astype(jnp.float32), k_bkne.astype(jnp.float32), precision="highest"
    ) / math.sqrt(e)
    sees_bkgtn = visible(q_pos_bt, pos_bkn, valid_bkn)[:, :, None]
    p_bkgtn = jax.nn.softmax(jnp.where(sees_bkgtn, s_bkgtn, NEG_INF), axis=-1)
    return jnp.where(sees_bkgtn, p_bkgtn, 0.0)


def streaming_llm_scores(pos_bkn, valid_bkn, *, sinks: int = 4, window: int | None = None) -> jax.Array:
    """StreamingLLM: +inf on the first `sinks` and the last `window` positions, -inf elsewhere.

    window=None: the non-sink entries score their position (newer = higher) instead, so a top-k
    keeps the sinks plus the newest k - sinks tokens. Invalid slots: -inf. Returns [B, K, N].
    """
    keep_bkn = first_positions(pos_bkn, valid_bkn, sinks)
    if window is None:
        rest_bkn = pos_bkn.astype(jnp.float32)
    else:
        keep_bkn = keep_bkn | last_positions(pos_bkn, valid_bkn, window)
        rest_bkn = jnp.full(pos_bkn.shape, -jnp.inf, jnp.float32)
    s_bkn = jnp.where(keep_bkn, jnp.inf, rest_bkn)
    return jnp.where(valid_bkn, s_bkn, -jnp.inf)


def pool1d(x_bkn: jax.Array, kernel: int, pooling: Literal["max", "avg"]) -> jax.Array:
    """Stride-1 pooling along the last axis with padding kernel // 2 on both sides (torch's
    max_pool1d / avg_pool1d with count_include_pad=True: the average always divides by kernel)."""
    dims = (1,) * (x_bkn.ndim - 1) + (kernel,)
    strides = (1,) * x_bkn.ndim
    pad = [(0, 0)] * (x_bkn.ndim - 1) + [(kernel // 2, kernel // 2)]
    if pooling == "max":
        return lax.reduce_window(x_bkn, -jnp.inf, lax.max, dims, strides, pad)
    return lax.reduce_window(x_bkn, 0.0, lax.add, dims, strides, pad) / kernel


def snapkv_scores(
    q_btkge,
    q_pos_bt,
    k_bkne,
    pos_bkn,
    valid_bkn,
    *,
    window: int = 32,
    kernel: int = 7,
    pooling: Literal["max", "avg"] = "max",
    group: Literal["sum", "max"] = "sum",
) -> jax.Array:
    """SnapKV: pooled attention votes of the observation window; the window's keys score +inf.

    Args:
      q_btkge, q_pos_bt: queries and positions; the last `window` of the T query slots are the
        observation window (the caller aligns rows so those are each row's last queries, e.g. left
        padding or a per-row query ring).
      k_bkne, pos_bkn, valid_bkn: the keys to score.
      window, kernel, pooling, group: see the module docstring.

    Returns:
      float32 [B, K, N]: keys at or after the first window query's position: +inf; earlier (the
      prefix): pooled votes; invalid: -inf.
    """
    q_btkge, q_pos_bt = q_btkge[:, -window:], q_pos_bt[:, -window:]
    p_bkgtn = attention_probs(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn)
    if group == "sum":
        votes_bkn = jnp.sum(p_bkgtn, axis=(2, 3))
    else:
        votes_bkn = jnp.sum(jnp.max(p_bkgtn, axis=2), axis=2)
    start_b = jnp.min(jnp.where(q_pos_bt >= 0, q_pos_bt, jnp.iinfo(jnp.int32).max), axis=1)
    in_window_bkn = valid_bkn & (pos_bkn >= start_b[:, None, None])
    prefix_bkn = valid_bkn & ~in_window_bkn
    fill = -jnp.inf if pooling == "max" else 0.0  # the neutral element: pooling sees the prefix only
    pooled_bkn = pool1d(jnp.where(prefix_bkn, votes_bkn, fill), kernel, pooling)
    return jnp.where(prefix_bkn, pooled_bkn, jnp.where(in_window_bkn, jnp.inf, -jnp.inf))


def h2o_scores(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, *, recent: int = 0) -> jax.Array:
    """H2O: attention received by each key, summed over the T queries and the G heads of its group.

    The last `recent` positions score +inf (the recent window); invalid slots -inf. [B, K, N].
    """
    p_bkgtn = attention_probs(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn)
    acc_bkn = jnp.sum(p_bkgtn, axis=(2, 3))
    if recent > 0:
        acc_bkn = jnp.where(last_positions(pos_bkn, valid_bkn, recent), jnp.inf, acc_bkn)
    return jnp.where(valid_bkn, acc_bkn, -jnp.inf)


def kvzip_scores(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, *, sinks: int = 4) -> jax.Array:
    """KVzip: the largest attention any query head of the group gives a key, over the T queries.

    The queries are a repeat pass's (the model re-reading the context), the keys KVzip's reduced
    set: the softmax runs over exactly the keys given, so the caller passes the sinks, the context
    chunk being reconstructed and the repeat input's own keys (reference/baselines.md 2.2). The
    first `sinks` positions score +inf (kvpress's n_sink; the paper keeps its whole system
    prompt); invalid slots -inf. float32 [B, K, N], in [0, 1] elsewhere.
    """
    p_bkgtn = attention_probs(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn)
    s_bkn = jnp.max(p_bkgtn, axis=(2, 3))
    s_bkn = jnp.where(first_positions(pos_bkn, valid_bkn, sinks), jnp.inf, s_bkn)
    return jnp.where(valid_bkn, s_bkn, -jnp.inf)


def quest_landmarks(k_bkne, valid_bkn, *, page: int = 16):
    """Per-page channel-wise min and max of the valid keys: (kmin [B, K, P, E], kmax [B, K, P, E],
    has_bkp [B, K, P]); P = ceil(N / page), the last page padded with invalid slots. Pages without a
    valid key get zeros (and has = False)."""
    b, kh, n, e = k_bkne.shape
    p = -(-n // page)
    k_bkne = jnp.pad(k_bkne.astype(jnp.float32), ((0, 0), (0, 0), (0, p * page - n), (0, 0)))
    valid_bkn = jnp.pad(valid_bkn, ((0, 0), (0, 0), (0, p * page - n)))
    k_bkpre = k_bkne.reshape(b, kh, p, page, e)
    v_bkpr1 = valid_bkn.reshape(b, kh, p, page, 1)
    has_bkp = jnp.any(v_bkpr1[..., 0], axis=-1)
    kmin = jnp.min(jnp.where(v_bkpr1, k_bkpre, jnp.inf), axis=3)
    kmax = jnp.max(jnp.where(v_bkpr1, k_bkpre, -jnp.inf), axis=3)
    return jnp.where(has_bkp[..., None], kmin, 0.0), jnp.where(has_bkp[..., None], kmax, 0.0), has_bkp


def quest_page_scores(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, *, page: int = 16) -> jax.Array:
    """Quest: per query head and page, sum_e max(q_e * min_e, q_e * max_e); -inf for pages the
    query cannot read (no valid key at or before its position). float32 [B, T, K, G, P]."""
    kmin_bkpe, kmax_bkpe, _ = quest_landmarks(k_bkne, valid_bkn, page=page)
    q = q_btkge.astype(jnp.float32)
    # max(q * lo, q * hi) = q * hi where q >= 0, q * lo where q < 0 (lo <= hi): two matmuls, no [.., P, E] temp
    bound_btkgp = jnp.einsum("btkge,bkpe->btkgp", jnp.maximum(q, 0.0), kmax_bkpe, precision="highest") + jnp.einsum(
        "btkge,bkpe->btkgp", jnp.minimum(q, 0.0), kmin_bkpe, precision="highest"
    )
    b, kh, n = pos_bkn.shape
    p = kmin_bkpe.shape[2]
    sees_bktn = jnp.pad(visible(q_pos_bt, pos_bkn, valid_bkn), ((0, 0), (0, 0), (0, 0), (0, p * page - n)))
    sees_btkp = jnp.any(sees_bktn.reshape(b, kh, -1, p, page), axis=-1).transpose(0, 2, 1, 3)
    return jnp.where(sees_btkp[:, :, :, None, :], bound_btkgp, -jnp.inf)


def pages_to_slots(keep_xp: jax.Array, page: int, n: int) -> jax.Array:
    """Expand a page mask [..., P] to a slot mask [..., N] (slot s belongs to page s // page)."""
    return jnp.repeat(keep_xp, page, axis=-1)[..., :n]
