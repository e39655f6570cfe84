"""Eviction-policy library: scores against plain numpy oracles (loops), exact selection, compaction,
cross-cutting invariants (reference/baselines.md section 6.1) and the registry's error paths.

Axis letters: l layer, b batch, k KV head, g query head in a group, t query time, n key slot,
p page, e head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from wgkv_jax import policies as P

INF = np.inf

# jitted entry points (one compile per shape and static config; eager op-by-op is slower here)
select_j = jax.jit(P.select, static_argnums=3)
score_j = jax.jit(lambda policy, x: policy.score(**x), static_argnums=0)
select_policy_j = jax.jit(lambda policy, s, valid: policy.select(s, valid), static_argnums=0)
keep_j = jax.jit(lambda policy, x: policy.keep(**x), static_argnums=0)
compact_j = jax.jit(P.compact, static_argnums=4)
streaming_j = jax.jit(P.streaming_llm_scores, static_argnames=("sinks", "window"))
snapkv_j = jax.jit(P.snapkv_scores, static_argnames=("window", "kernel", "pooling", "group"))
h2o_j = jax.jit(P.h2o_scores, static_argnames=("recent",))
quest_j = jax.jit(P.quest_page_scores, static_argnames=("page",))


# ---------------------------------------------------------------------------------------------
# inputs: B rows of K KV heads, N slots; rows left- or right-padded to their own lengths
# ---------------------------------------------------------------------------------------------


def make_inputs(seed=0, *, lengths=(12, 8), kv=2, g=2, n=12, e=4, pad="left"):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    k_bkne = rng.standard_normal((b, kv, n, e)).astype(np.float32)
    q_btkge = rng.standard_normal((b, n, kv, g, e)).astype(np.float32)
    pos_bkn = np.full((b, kv, n), -1, np.int32)
    q_pos_bt = np.full((b, n), -1, np.int32)
    for row, length in enumerate(lengths):
        slots = np.arange(n - length, n) if pad == "left" else np.arange(length)
        pos_bkn[row, :, slots] = np.arange(length)[:, None]
        q_pos_bt[row, slots] = np.arange(length)
    valid_bkn = pos_bkn >= 0
    return dict(k=k_bkne, q=q_btkge, pos=pos_bkn, q_pos=q_pos_bt, valid=valid_bkn)


def real_slots(x, row, length, pad):
    """The real (unpadded) part of row `row` along the slot axis (last axis)."""
    n = x.shape[-1]
    return x[..., n - length :] if pad == "left" else x[..., :length]


# ---------------------------------------------------------------------------------------------
# numpy oracles, written from the papers' formulas with loops (no jnp)
# ---------------------------------------------------------------------------------------------


def np_softmax_row(q_e, keys_ne):
    logits = np.array([float(np.dot(q_e.astype(np.float64), kn.astype(np.float64))) for kn in keys_ne])
    logits /= math.sqrt(q_e.shape[0])
    ex = np.exp(logits - logits.max())
    return ex / ex.sum()


def np_causal_probs_row(q_tkge, k_kne):
    """Unpadded row, positions 0..n-1, query t at position t: p[k, g, t, j] (0 for j > t)."""
    t_len, kv, g, _ = q_tkge.shape
    n = k_kne.shape[1]
    p = np.zeros((kv, g, t_len, n))
    for kk in range(kv):
        for gg in range(g):
            for t in range(t_len):
                p[kk, gg, t, : t + 1] = np_softmax_row(q_tkge[t, kk, gg], k_kne[kk, : t + 1])
    return p


def np_snapkv_row(q_tkge, k_kne, window, kernel, pooling, group):
    """SnapKV on one unpadded row, as the reference code: window attention, votes of the prefix,
    zero / -inf padded pooling over the prefix, window kept (+inf)."""
    kv, n, _ = k_kne.shape
    w = min(window, n)
    p = np_causal_probs_row(q_tkge, k_kne)[:, :, n - w :]  # the last w queries
    out = np.empty((kv, n))
    pad = kernel // 2
    for kk in range(kv):
        votes = np.zeros(n)
        for j in range(n):
            for t in range(w):
                col = [p[kk, gg, t, j] for gg in range(p.shape[1])]
                votes[j] += sum(col) if group == "sum" else max(col)
        prefix = votes[: n - w]
        for j in range(n - w):
            win = []
            for i in range(j - pad, j + pad + 1):
                win.append(prefix[i] if 0 <= i < n - w else (-INF if pooling == "max" else 0.0))
            out[kk, j] = max(win) if pooling == "max" else sum(win) / kernel
        out[kk, n - w :] = INF
    return out


def np_h2o_row(q_tkge, k_kne, recent):
    kv, n, _ = k_kne.shape
    p = np_causal_probs_row(q_tkge, k_kne)
    out = np.zeros((kv, n))
    for kk in range(kv):
        for j in range(n):
            out[kk, j] = sum(p[kk, gg, t, j] for gg in range(p.shape[1]) for t in range(p.shape[2]))
        for j in range(n - recent, n):
            if recent and j >= 0:
                out[kk, j] = INF
    return out


def np_streaming(pos_bkn, valid_bkn, sinks, window):
    out = np.full(pos_bkn.shape, -INF)
    for b in range(pos_bkn.shape[0]):
        for kk in range(pos_bkn.shape[1]):
            top = max([pos_bkn[b, kk, n] for n in range(pos_bkn.shape[2]) if valid_bkn[b, kk, n]], default=-1)
            for n in range(pos_bkn.shape[2]):
                if not valid_bkn[b, kk, n]:
                    continue
                p = pos_bkn[b, kk, n]
                if p < sinks or (window is not None and p > top - window):
                    out[b, kk, n] = INF
                elif window is None:
                    out[b, kk, n] = p
    return out


def np_quest(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, page):
    b_len, t_len, kv, g, e = q_btkge.shape
    n = k_bkne.shape[2]
    pages = -(-n // page)
    out = np.full((b_len, t_len, kv, g, pages), -INF)
    for b in range(b_len):
        for kk in range(kv):
            for pg in range(pages):
                slots = [s for s in range(pg * page, min(n, (pg + 1) * page)) if valid_bkn[b, kk, s]]
                if not slots:
                    continue
                lo = np.min(k_bkne[b, kk, slots].astype(np.float64), axis=0)
                hi = np.max(k_bkne[b, kk, slots].astype(np.float64), axis=0)
                for t in range(t_len):
                    if q_pos_bt[b, t] < 0 or not any(pos_bkn[b, kk, s] <= q_pos_bt[b, t] for s in slots):
                        continue
                    for gg in range(g):
                        qv = q_btkge[b, t, kk, gg].astype(np.float64)
                        out[b, t, kk, gg, pg] = sum(max(qv[i] * lo[i], qv[i] * hi[i]) for i in range(e))
    return out


def np_rank(score, valid, protect, safe=False):
    """select's order: protected (all equal) > safeguarded > valid by score > invalid; ties ->
    lower index (so when more than k are protected, the k lowest slots are kept, as documented)."""
    s = -INF if np.isnan(score) else float(np.float32(score))
    if not valid:
        return (0, 0.0)
    return (3, 0.0) if protect else (2 if safe else 1, s)


def np_top(entries, k):
    """entries: list of (rank tuple, index, valid); the kept indices."""
    order = sorted(entries, key=lambda x: (-x[0][0], -x[0][1], x[1]))
    return {idx for (_, idx, ok) in order[:k] if ok}


def np_select(scores, valid, protect, kind, k, alpha=0.0):
    """Oracle of select for scores [..., H, N] (Global: [L, ..., H, N]); k = the static count."""
    out = np.zeros(scores.shape, bool)
    if kind == "head":
        for idx in np.ndindex(scores.shape[:-1]):
            ent = [
                (np_rank(scores[idx][n], valid[idx][n], protect[idx][n]), n, valid[idx][n])
                for n in range(scores.shape[-1])
            ]
            for n in np_top(ent, k):
                out[(*idx, n)] = True
        return out
    if kind == "layer":
        scores, valid, protect = (x[None] for x in (scores, valid, protect))
        out = out[None]
    layers, heads, slots = scores.shape[0], scores.shape[-2], scores.shape[-1]
    units = layers * heads
    n_safe = int(alpha * k / units)
    for mid in np.ndindex(scores.shape[1:-2]):
        ent = []
        for lay in range(layers):
            for h in range(heads):
                idx = (lay, *mid, h)
                per = [
                    (np_rank(scores[idx][n], valid[idx][n], protect[idx][n]), n, valid[idx][n]) for n in range(slots)
                ]
                safe = np_top(per, n_safe) if n_safe else set()
                for n in range(slots):
                    rank = np_rank(scores[idx][n], valid[idx][n], protect[idx][n], safe=n in safe)
                    ent.append((rank, (lay * heads + h) * slots + n, valid[idx][n]))
        for flat in np_top(ent, k):
            lay, rest = divmod(flat, heads * slots)
            h, n = divmod(rest, slots)
            out[(lay, *mid, h, n)] = True
    return out[0] if kind == "layer" else out


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# scores == numpy oracles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 3])
def test_streaming_llm_scores_match_oracle(window):
    x = make_inputs(1, lengths=(12, 7, 2), pad="right")
    got = streaming_j(x["pos"], x["valid"], sinks=2, window=window)
    close(got, np_streaming(x["pos"], x["valid"], 2, window))


@pytest.mark.parametrize(
    ("pooling", "group", "kernel"), [("max", "sum", 3), ("avg", "sum", 5), ("max", "max", 1), ("avg", "max", 3)]
)
def test_snapkv_scores_match_oracle_per_row(pooling, group, kernel):
    """Left-padded batch == the reference algorithm run on each row alone (batch independence)."""
    lengths, window = (12, 9), 4
    x = make_inputs(2, lengths=lengths, pad="left")
    got = np.asarray(
        snapkv_j(
            x["q"], x["q_pos"], x["k"], x["pos"], x["valid"], window=window, kernel=kernel, pooling=pooling, group=group
        )
    )
    for row, length in enumerate(lengths):
        q_row = x["q"][row, -length:]
        k_row = x["k"][row, :, -length:]
        close(real_slots(got[row], row, length, "left"), np_snapkv_row(q_row, k_row, window, kernel, pooling, group))
        assert np.all(got[row, :, : 12 - length] == -INF)


def test_h2o_scores_match_oracle_right_padded():
    """Right padding: padded queries (q_pos -1) and keys contribute nothing."""
    lengths, recent = (10, 6), 2
    x = make_inputs(3, lengths=lengths, n=10, pad="right")
    got = np.asarray(h2o_j(x["q"], x["q_pos"], x["k"], x["pos"], x["valid"], recent=recent))
    for row, length in enumerate(lengths):
        oracle = np_h2o_row(x["q"][row, :length], x["k"][row, :, :length], recent)
        close(got[row, :, :length], oracle)
        assert np.all(got[row, :, length:] == -INF)


def test_quest_page_scores_match_oracle():
    """Partial last page (N = 11, page 4), padded keys, a padded query and a causal cut."""
    x = make_inputs(4, lengths=(11, 6), n=11, pad="right")
    q_pos = x["q_pos"].copy()
    q_pos[0, 0] = 3  # sees only page 0 of row 0
    got = quest_j(x["q"], q_pos, x["k"], x["pos"], x["valid"], page=4)
    close(got, np_quest(x["q"], q_pos, x["k"], x["pos"], x["valid"], 4))
    assert got.shape == (2, 11, 2, 2, 3)


def test_attention_probs_rows_sum_to_one():
    x = make_inputs(5, lengths=(9, 4), n=9, pad="right")
    p = np.asarray(P.attention_probs(x["q"], x["q_pos"], x["k"], x["pos"], x["valid"]))
    sums = p.sum(-1)  # [B, K, G, T]
    expect = (x["q_pos"] >= 0)[:, None, None, :].astype(float)
    close(sums, np.broadcast_to(expect, sums.shape))


# ---------------------------------------------------------------------------------------------
# select: exact budgets against the oracle, for every budget kind
# ---------------------------------------------------------------------------------------------


def random_scores(seed, shape, *, ties=True):
    rng = np.random.default_rng(seed)
    s = rng.integers(-3, 4, shape).astype(np.float32) if ties else rng.standard_normal(shape).astype(np.float32)
    s[rng.random(shape) < 0.1] = -INF
    s[rng.random(shape) < 0.05] = INF
    valid = rng.random(shape) < 0.8
    protect = rng.random(shape) < 0.1
    return s, valid, protect


@pytest.mark.parametrize(
    ("budget", "kind", "k", "alpha"),
    [
        (P.PerHead(P.KeepRatio(0.5)), "head", 5, 0.0),
        (P.PerHead(P.Tokens(3)), "head", 3, 0.0),
        (P.PerHead(P.Tokens(50)), "head", 10, 0.0),
        (P.PerLayer(P.KeepRatio(0.4), alpha=0.0), "layer", 12, 0.0),
        (P.PerLayer(P.Tokens(4), alpha=0.5), "layer", 12, 0.5),
        (P.Global(P.KeepRatio(0.25)), "global", 15, 0.0),
        (P.Global(P.Tokens(3), alpha=0.4), "global", 18, 0.4),
    ],
)
def test_select_matches_oracle(budget, kind, k, alpha):
    shape = (2, 2, 3, 10) if kind == "global" else (2, 3, 10)  # [L,] B, K, N
    s, valid, protect = random_scores(7, shape)
    got = np.asarray(select_j(jnp.asarray(s), valid, protect, budget))
    want = np_select(s, valid, protect, kind, k, alpha)
    np.testing.assert_array_equal(got, want)
    assert not np.any(got & ~valid)


def test_select_counts_are_exact_and_protected_first():
    s, valid, protect = random_scores(8, (3, 4, 16), ties=False)
    valid[0] = True  # a row with every slot valid
    valid[2, :, 5:] = False  # a row with 5 valid slots per head: fewer than k
    protect[..., :2] = True  # at most 4 protected per head (2 here + the random ones, capped below)
    protect[..., 4:] &= False
    for budget, axes, k in [(P.PerHead(P.Tokens(6)), (-1,), 6), (P.PerLayer(P.Tokens(6), alpha=0.2), (-2, -1), 24)]:
        keep = np.asarray(select_j(s, valid, protect, budget))
        np.testing.assert_array_equal(keep.sum(axes), np.minimum(valid.sum(axes), k))
        assert np.all(keep[protect & valid])


def test_select_ties_go_to_the_older_slot_and_nest():
    s = np.zeros((1, 1, 8), np.float32)
    keep = np.asarray(select_j(s, None, None, P.PerHead(P.Tokens(3))))
    np.testing.assert_array_equal(keep[0, 0], [1, 1, 1, 0, 0, 0, 0, 0])
    signed_zeros = np.array([[[1.0, -0.0, 0.0]]], np.float32)  # -0.0 == 0.0: the older slot wins
    np.testing.assert_array_equal(np.asarray(select_j(signed_zeros, None, None, P.Tokens(2)))[0, 0], [1, 1, 0])
    s, valid, protect = random_scores(9, (2, 2, 20))
    prev = np.zeros(s.shape, bool)
    for n in (1, 4, 9, 20):  # I5: keep(k) grows monotonically with k
        keep = np.asarray(select_j(s, valid, protect, P.PerHead(P.Tokens(n))))
        assert np.all(keep >= prev)
        prev = keep


def test_select_minus_inf_valid_beats_invalid_and_threshold_is_a_mask():
    s = np.array([[[-INF, 5.0, -INF, 1.0]]], np.float32)
    valid = np.array([[[True, True, False, True]]])
    keep = np.asarray(select_j(s, valid, None, P.PerHead(P.Tokens(4))))
    np.testing.assert_array_equal(keep[0, 0], [1, 1, 0, 1])
    protect = np.array([[[True, False, True, False]]])
    keep = np.asarray(select_j(s, valid, protect, P.Threshold(2.0)))
    np.testing.assert_array_equal(keep[0, 0], [1, 1, 0, 0])


@pytest.mark.parametrize(("ratio", "n", "k"), [(0.25, 8, 2), (0.29, 100, 29), (0.7, 10, 7), (0.01, 8, 1), (1.0, 5, 5)])
def test_keep_ratio_count_is_floor_and_never_empty(ratio, n, k):
    assert P.KeepRatio(ratio).count(n) == k
    assert P.PerLayer(P.KeepRatio(ratio)).count(n, 3) == max(1, math.floor(ratio * n * 3 + 1e-9))


@settings(
    max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck)
)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 12),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 14),
    kind=st.sampled_from(["head", "layer"]),
)
def test_select_property_exact_budget(seed, n, heads, tokens, kind):
    s, valid, protect = random_scores(seed, (2, heads, n))
    budget = P.PerHead(P.Tokens(tokens)) if kind == "head" else P.PerLayer(P.Tokens(tokens), alpha=0.3)
    keep = np.asarray(select_j(s, valid, protect, budget))
    k = min(tokens, n) if kind == "head" else min(tokens * heads, heads * n)
    axes = (-1,) if kind == "head" else (-2, -1)
    np.testing.assert_array_equal(keep.sum(axes), np.minimum(valid.sum(axes), k))
    assert not np.any(keep & ~valid)
    np.testing.assert_array_equal(keep, np_select(s, valid, protect, kind, k, 0.3 if kind == "layer" else 0.0))


# ---------------------------------------------------------------------------------------------
# compact
# ---------------------------------------------------------------------------------------------


def np_compact(k_bkne, v_bkne, pos_bkn, keep_bkn, c_out):
    b, kv, n, e = k_bkne.shape
    k_out = np.zeros((b, kv, c_out, e), np.float32)
    v_out = np.zeros((b, kv, c_out, e), np.float32)
    pos_out = np.full((b, kv, c_out), -1)
    length = np.zeros((b, kv), int)
    for bb in range(b):
        for kk in range(kv):
            order = sorted([s for s in range(n) if keep_bkn[bb, kk, s]], key=lambda s: (pos_bkn[bb, kk, s], s))
            order = order[:c_out]
            length[bb, kk] = len(order)
            for j, s in enumerate(order):
                k_out[bb, kk, j], v_out[bb, kk, j], pos_out[bb, kk, j] = (
                    k_bkne[bb, kk, s],
                    v_bkne[bb, kk, s],
                    pos_bkn[bb, kk, s],
                )
    return k_out, v_out, pos_out, length


@pytest.mark.parametrize("c_out", [3, 6, 14])
def test_compact_matches_oracle(c_out):
    rng = np.random.default_rng(10)
    k = rng.standard_normal((2, 2, 10, 3)).astype(np.float32)
    v = rng.standard_normal((2, 2, 10, 3)).astype(np.float32)
    pos = np.stack([rng.permutation(10) for _ in range(4)]).reshape(2, 2, 10).astype(np.int32)  # slots out of order
    keep = rng.random((2, 2, 10)) < 0.5
    got = compact_j(k, v, pos, keep, c_out)
    want = np_compact(k, v, pos, keep, c_out)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert got[0].shape == (2, 2, c_out, 3)


def test_compact_is_identity_on_the_valid_prefix_when_everything_is_kept():
    x = make_inputs(11, lengths=(12, 5), n=12, pad="right")
    v = x["k"] * 2.0
    keep = np.asarray(keep_j(P.get("snapkv", keep_ratio=1.0, window=4), x))
    np.testing.assert_array_equal(keep, x["valid"])  # I1: budget >= length keeps everything
    k2, v2, pos2, length = compact_j(x["k"], v, x["pos"], keep, 12)
    valid = x["valid"]
    np.testing.assert_array_equal(np.asarray(k2)[valid], x["k"][valid])
    np.testing.assert_array_equal(np.asarray(v2)[valid], v[valid])
    np.testing.assert_array_equal(np.asarray(pos2), x["pos"])
    np.testing.assert_array_equal(np.asarray(length), valid.sum(-1))
    assert np.all(np.asarray(k2)[~valid] == 0)


# ---------------------------------------------------------------------------------------------
# policies end to end: invariants for every policy and budget kind
# ---------------------------------------------------------------------------------------------


POLICY_CASES = [
    ("streaming_llm", dict(sinks=2), (2, 0)),
    ("snapkv", dict(window=3, kernel=3), (0, 3)),
    ("h2o", dict(recent=2), (0, 2)),
]
BUDGETS = [P.PerHead(P.Tokens(6)), P.PerLayer(P.Tokens(6), alpha=0.2), P.Global(P.Tokens(6))]


@pytest.mark.parametrize(("name", "options", "reserved"), POLICY_CASES)
def test_policy_invariants(name, options, reserved):
    """For every budget kind: exact budget, padding never kept, protected (sinks / window) always
    kept, short rows kept whole, survivors keep order and positions after compaction; two layers,
    batch 3 with padding."""
    lengths = (14, 9, 3)
    layers = [make_inputs(20 + i, lengths=lengths, n=14, pad="left") for i in range(2)]
    # these policies' scores do not depend on the budget kind: score once, select three ways
    s_lbkn = jnp.stack([score_j(P.get(name, budget=BUDGETS[0], **options), x) for x in layers])
    valid_lbkn = np.stack([x["valid"] for x in layers])
    pos_lbkn = np.stack([x["pos"] for x in layers])
    sinks, recent = reserved
    top = pos_lbkn.max(-1, keepdims=True)
    protected = valid_lbkn & ((pos_lbkn < sinks) | (pos_lbkn > top - recent))
    for budget, axes, k in zip(BUDGETS, [(-1,), (-2, -1), (0, 2, 3)], [6, 12, 24], strict=True):
        policy = P.get(name, budget=budget, **options)
        if isinstance(budget, P.Global):
            keep_lbkn = np.asarray(select_policy_j(policy, s_lbkn, valid_lbkn))
        else:  # one layer at a time, as a layer-by-layer prefill would
            keep_lbkn = np.stack([np.asarray(select_policy_j(policy, s_lbkn[i], valid_lbkn[i])) for i in range(2)])
        np.testing.assert_array_equal(keep_lbkn.sum(axes), np.minimum(valid_lbkn.sum(axes), k))
        assert not np.any(keep_lbkn & ~valid_lbkn)
        assert np.all(keep_lbkn[protected])
        assert np.all(keep_lbkn[:, 2] == valid_lbkn[:, 2])  # a 3-token row is kept whole, never emptied
    x = layers[0]
    _, _, pos2, length = compact_j(x["k"], x["k"], x["pos"], keep_lbkn[0], 12)
    for b in range(3):
        for kk in range(2):
            kept_pos = x["pos"][b, kk][keep_lbkn[0, b, kk]]
            np.testing.assert_array_equal(np.asarray(pos2)[b, kk, : len(kept_pos)], np.sort(kept_pos))
            assert int(length[b, kk]) == len(kept_pos)


def test_streaming_llm_keeps_exactly_sinks_and_window():
    x = make_inputs(30, lengths=(12, 4), n=12, pad="right")
    keep = np.asarray(keep_j(P.get("streaming_llm", sinks=2, window=3), x))
    np.testing.assert_array_equal(np.nonzero(keep[0, 0])[0], [0, 1, 9, 10, 11])
    np.testing.assert_array_equal(keep[1], x["valid"][1])  # 4 tokens <= sinks + window
    by_budget = np.asarray(keep_j(P.get("streaming_llm", tokens=5, sinks=2), x))
    np.testing.assert_array_equal(by_budget, keep)  # window=None: the budget sets the window


def test_h2o_default_recent_is_half_the_budget():
    x = make_inputs(31, lengths=(12, 12), n=12)
    policy = P.get("h2o", tokens=6)
    assert policy.recent_for(12) == 3
    keep = np.asarray(keep_j(policy, x))
    assert np.all(keep[..., -3:])
    np.testing.assert_array_equal(keep.sum(-1), 6)


def test_quest_selects_pages_per_query():
    x = make_inputs(32, lengths=(16, 9), n=16, pad="right")
    policy = P.get("quest", tokens=8, page=4)  # 2 pages of 4
    s = np.asarray(score_j(policy, x))
    pages = np.asarray(select_policy_j(policy, s, None))
    readable = s > -INF
    np.testing.assert_array_equal(pages.sum(-1), np.minimum(readable.sum(-1), 2))
    assert not np.any(pages & ~readable)
    sees_btkn = (
        x["valid"][:, None] & (x["pos"][:, None] <= x["q_pos"][:, :, None, None]) & (x["q_pos"] >= 0)[:, :, None, None]
    )
    slots = np.asarray(keep_j(policy, x))
    assert slots.shape == (2, 16, 2, 2, 16)
    np.testing.assert_array_equal(slots, np.repeat(pages, 4, axis=-1) & sees_btkn[:, :, :, None, :])
    everything = P.get("quest", keep_ratio=1.0, page=4, group="max")
    keep_all = np.asarray(keep_j(everything, x))  # [B, T, K, N]: every readable page
    np.testing.assert_array_equal(keep_all, sees_btkn)


def test_chain_protect_and_sequential_stages():
    x = make_inputs(33, lengths=(14, 10), n=14, pad="left")
    snap = P.get("snapkv", tokens=6, window=2, kernel=3)
    guarded = P.Chain([P.Protect(sinks=2, recent=1), snap])
    keep = np.asarray(keep_j(guarded, x))
    assert np.all(keep[x["valid"] & (x["pos"] < 2)])
    np.testing.assert_array_equal(keep.sum(-1), 6)
    two = P.Chain([P.get("h2o", tokens=9, recent=2), P.Protect(sinks=1), snap])
    keep2 = np.asarray(keep_j(two, x))
    stage1 = np.asarray(keep_j(P.Chain([P.Protect(sinks=1), P.get("h2o", tokens=9, recent=2)]), x))
    assert np.all(keep2 <= stage1)  # the second stage chooses among the survivors of the first
    np.testing.assert_array_equal(keep2.sum(-1), 6)
    assert np.all(keep2[x["valid"] & (x["pos"] < 1)])


def test_policies_are_hashable_and_jit_static():
    """Equal policies hash equal, so a jit with the policy as a static argument traces once."""
    x = make_inputs(34, lengths=(12, 7), n=12)

    def make():
        return P.Chain([P.Protect(sinks=1), P.get("snapkv", keep_ratio=0.5, window=2, kernel=3)])

    assert make() == make() and hash(make()) == hash(make())
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def run(pol, pos, valid, k, q, q_pos):
        traces.append(pol)
        return pol.keep(pos=pos, valid=valid, k=k, q=q, q_pos=q_pos)

    first = np.asarray(run(make(), x["pos"], x["valid"], x["k"], x["q"], x["q_pos"]))
    second = np.asarray(run(make(), x["pos"], x["valid"], x["k"], x["q"], x["q_pos"]))
    assert len(traces) == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first.sum(-1), 6)


# ---------------------------------------------------------------------------------------------
# registry and errors
# ---------------------------------------------------------------------------------------------


def test_registry_lists_and_builds():
    names = P.available()
    assert names == sorted(names) and {"ahakv", "h2o", "kvzip", "quest", "snapkv", "streaming_llm"} <= set(names)
    assert P.get("kvzip", keep_ratio=0.3).budget == P.Global(P.KeepRatio(0.3))  # KVzip's "pair" level
    assert P.get("kvzip", budget=P.PerHead(P.Tokens(5))).budget == P.PerHead(P.Tokens(5))
    pol = P.get("snapkv", keep_ratio=0.25)
    assert isinstance(pol, P.SnapKV) and pol.budget == P.PerHead(P.KeepRatio(0.25))
    assert (pol.window, pol.kernel, pol.pooling) == (32, 7, "max")
    assert P.get("h2o", budget=P.PerLayer(P.Tokens(8))).budget == P.PerLayer(P.Tokens(8))
    assert P.get("streaming_llm", window=6).budget == P.PerHead(P.Tokens(10))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: P.get("snapkvv", keep_ratio=0.5), r"'snapkvv'.*\['ahakv', 'cascading', .*'snapkv', 'streaming_llm'\]"),
        (lambda: P.get("snapkv", keep_ratio=0.0), "0.0"),
        (lambda: P.get("snapkv", keep_ratio=1.5), "1.5"),
        (lambda: P.get("h2o", tokens=0), "0"),
        (lambda: P.get("snapkv", keep_ratio=0.5, window=-1), "window=-1"),
        (lambda: P.get("snapkv", keep_ratio=0.5, kernel=4), "kernel=4"),
        (lambda: P.get("snapkv", keep_ratio=0.5, pooling="mean"), "'mean'"),
        (lambda: P.get("h2o", keep_ratio=0.5, recent=-3), "recent=-3"),
        (lambda: P.get("streaming_llm", keep_ratio=0.5, sinks=-1), "sinks=-1"),
        (lambda: P.get("snapkv", keep_ratio=0.5, windw=3), r"windw.*window"),
        (lambda: P.get("snapkv", keep_ratio=0.5, tokens=4), "one of"),
        (lambda: P.get("snapkv"), "needs a budget"),
        (lambda: P.get("streaming_llm", window=4, tokens=5), "not both"),
        (lambda: P.get("quest", budget=P.PerLayer(P.Tokens(8))), "PerHead"),
        (lambda: P.get("h2o", budget=P.Threshold(0.1)), "recent="),
        (lambda: P.Chain([P.Protect(sinks=2)]), "at least one"),
        (lambda: P.Chain([P.get("quest", tokens=8)]), "Quest"),
        (lambda: P.PerLayer(P.KeepRatio(0.5), alpha=2.0), "alpha=2.0"),
        (lambda: P.PerHead(0.5), "KeepRatio"),
        (lambda: P.Protect(recent=-2), "recent=-2"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_budget_that_cannot_hold_the_protected_window_raises():
    x = make_inputs(40, lengths=(12, 12), n=12)
    with pytest.raises(ValueError, match=r"keeps 2 of 12 slots.*window=4"):
        keep_j(P.get("snapkv", tokens=2, window=4), x)
    with pytest.raises(ValueError, match="sinks=3"):
        keep_j(P.Chain([P.Protect(sinks=3), P.get("h2o", tokens=4, recent=2)]), x)
    with pytest.raises(ValueError, match="needs q="):
        P.get("h2o", tokens=4).score(pos=x["pos"], valid=x["valid"], k=x["k"])
