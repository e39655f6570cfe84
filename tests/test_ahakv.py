"""AhaKV: scores against a plain numpy oracle (loops), and the invariants A1-A7 of
reference/baselines.md section 6.3 (reductions, count invariance, budget, gain, value prior,
positional bias, decode bookkeeping).

Axis letters: b batch, k KV head, g query head in a group, t query time, n key slot, c cache slot,
e head dim.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from test_policies import make_inputs, np_h2o_row, np_snapkv_row, np_softmax_row, real_slots

from wgkv_jax import policies as P
from wgkv_jax.policies.ahakv import (
    AhaKV,
    RecentAccumulator,
    ahakv_rows,
    ahakv_scores,
    sg_attention_probs,
    step_gain,
)

INF = np.inf

_STATIC = ("recent", "gain", "ref_len", "value_prior", "group", "protect")
ahakv_j = jax.jit(ahakv_scores, static_argnames=_STATIC)
rows_j = jax.jit(ahakv_rows, static_argnames=("gain", "ref_len", "group"))
sg_probs_j = jax.jit(sg_attention_probs, static_argnames=("gain", "ref_len"))
score_j = jax.jit(lambda policy, x: policy.score(**x), static_argnums=0)
keep_j = jax.jit(lambda policy, x: policy.keep(**x), static_argnums=0)
select_j = jax.jit(lambda policy, s, valid: policy.select(s, valid), static_argnums=0)


def with_values(x, seed):
    """make_inputs' arrays plus values shaped like the keys."""
    v = np.random.default_rng(seed + 1000).standard_normal(x["k"].shape).astype(np.float32)
    return dict(x, v=v)


def scores_of(x, **options):
    return np.asarray(ahakv_j(x["q"], x["q_pos"], x["k"], x["v"], x["pos"], x["valid"], **options))


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# numpy oracle: one unpadded row, positions 0..L-1, query t at position t
# ---------------------------------------------------------------------------------------------


def np_gain(pos, gain, ref_len):
    length = pos + 1
    if gain == "none":
        return 1.0
    if gain == "log":
        return max(1.0, math.log(length) / math.log(ref_len))
    octave = length.bit_length() - 1  # the largest power of two <= length is 2**octave
    return max(1.0, octave * math.log(2.0) / math.log(ref_len))


def np_ahakv_row(q_tkge, k_kne, v_kne, recent, gain, ref_len, prior, group):
    length, kv, g, _ = q_tkge.shape
    out = np.zeros((kv, length))
    for kk in range(kv):
        for t in range(max(0, length - recent), length):
            lam = np_gain(t, gain, ref_len)
            heads = [np_softmax_row(lam * q_tkge[t, kk, gg].astype(np.float64), k_kne[kk, : t + 1]) for gg in range(g)]
            for j in range(t + 1):
                col = [h[j] for h in heads]
                out[kk, j] += {"sum": sum(col), "mean": sum(col) / g, "max": max(col)}[group]
        norms = [float(np.sqrt(np.sum(v_kne[kk, j].astype(np.float64) ** 2))) for j in range(length)]
        for j in range(length):
            if prior == "l2":
                out[kk, j] *= norms[j]
            elif prior == "l2_normalized":
                out[kk, j] *= norms[j] / (sum(norms) / length)
            if j >= length - recent:
                out[kk, j] = INF
    return out


@pytest.mark.parametrize(
    ("gain", "prior", "group"), [("log", "l2", "sum"), ("step", "l2_normalized", "max"), ("none", "none", "mean")]
)
def test_ahakv_scores_match_numpy_oracle(gain, prior, group):
    """Left-padded batch 2, GQA G = 2: each row == the oracle run on that row alone; padding -inf."""
    lengths, recent, ref_len = (12, 9), 4, 3
    x = with_values(make_inputs(1, lengths=lengths, g=2, pad="left"), 1)
    got = scores_of(x, recent=recent, gain=gain, ref_len=ref_len, value_prior=prior, group=group)
    for row, length in enumerate(lengths):
        want = np_ahakv_row(
            x["q"][row, -length:],
            x["k"][row, :, -length:],
            x["v"][row, :, -length:],
            recent,
            gain,
            ref_len,
            prior,
            group,
        )
        close(real_slots(got[row], row, length, "left"), want)
        assert np.all(got[row, :, : 12 - length] == -INF)


# ---------------------------------------------------------------------------------------------
# A1 reductions, A2 count invariance
# ---------------------------------------------------------------------------------------------


def test_a1_reduces_to_h2o_and_observed_attention():
    """lambda = 1, no prior, r = all rows, unprotected: H2O's accumulated attention; divided by the
    number of rows that see each key: kvpress's ObservedAttention (the mean attention received)."""
    lengths = (10, 6)
    x = with_values(make_inputs(3, lengths=lengths, n=10, pad="right"), 3)
    got = scores_of(x, recent=10, gain="none", value_prior="none", protect=False)
    rows = np.asarray(rows_j(x["q"], x["q_pos"], x["k"], x["pos"], x["valid"], gain="none", group="sum"))
    for row, length in enumerate(lengths):
        h2o = np_h2o_row(x["q"][row, :length], x["k"][row, :, :length], 0)
        close(got[row, :, :length], h2o)
        seen_by = (rows[row][:, :length, :length] > 0).sum(1)  # [K, L]: rows i >= j see key j
        np.testing.assert_array_equal(seen_by, np.broadcast_to(length - np.arange(length), seen_by.shape))
        close(got[row, :, :length] / seen_by, h2o / (length - np.arange(length)))
        assert np.all(got[row, :, length:] == -INF)


@pytest.mark.parametrize("group", ["sum", "max"])
def test_a1_window_only_equals_snapkv_before_pooling(group):
    """r = window, lambda = 1, no prior: SnapKV's window votes with no pooling (kernel 1), window +inf."""
    lengths, window = (12, 9), 4
    x = with_values(make_inputs(2, lengths=lengths, pad="left"), 2)
    got = scores_of(x, recent=window, gain="none", value_prior="none", group=group)
    snap = np.asarray(
        P.snapkv_scores(x["q"], x["q_pos"], x["k"], x["pos"], x["valid"], window=window, kernel=1, group=group)
    )
    close(got, snap)
    for row, length in enumerate(lengths):
        oracle = np_snapkv_row(x["q"][row, -length:], x["k"][row, :, -length:], window, 1, "max", group)
        close(real_slots(got[row], row, length, "left"), oracle)
    mean = scores_of(x, recent=window, gain="none", value_prior="none", group="mean")
    if group == "sum":
        close(mean, got / 2)  # G = 2


def test_a2_every_candidate_gets_exactly_r_contributions():
    """RA: each non-recent key is summed over exactly r rows whatever its position; H2O's sum over all
    rows gives key j L - j contributions (the count bias AhaKV removes)."""
    lengths, recent = (12, 9), 4
    x = make_inputs(4, lengths=lengths, pad="left")
    window_rows = np.asarray(
        rows_j(x["q"][:, -recent:], x["q_pos"][:, -recent:], x["k"], x["pos"], x["valid"], gain="log", group="sum")
    )
    all_rows = np.asarray(rows_j(x["q"], x["q_pos"], x["k"], x["pos"], x["valid"], gain="log", group="sum"))
    for row, length in enumerate(lengths):
        ra_count = real_slots((window_rows[row] > 0).sum(1), row, length, "left")  # [K, L]
        np.testing.assert_array_equal(ra_count[:, : length - recent], recent)
        h2o_count = real_slots((all_rows[row] > 0).sum(1), row, length, "left")
        np.testing.assert_array_equal(h2o_count, np.broadcast_to(length - np.arange(length), h2o_count.shape))


# ---------------------------------------------------------------------------------------------
# A3 budget, A5 value prior
# ---------------------------------------------------------------------------------------------


def test_a3_budget_and_recent_window_through_select():
    """Exactly B kept per head (per layer for PerLayer) once the row is longer, the last r always,
    nothing evicted while the row fits; recent=None is half the per-head budget."""
    lengths = (12, 9, 4)
    x = with_values(make_inputs(5, lengths=lengths, pad="left"), 5)
    top = x["pos"].max(-1, keepdims=True)
    for policy, recent in [(AhaKV(budget=P.Tokens(6), recent=2), 2), (AhaKV(budget=P.Tokens(6)), 3)]:
        assert policy.recent_for(12) == recent
        keep = np.asarray(keep_j(policy, x))
        np.testing.assert_array_equal(keep.sum(-1), np.minimum(x["valid"].sum(-1), 6))
        assert np.all(keep[x["valid"] & (x["pos"] > top - recent)])
        np.testing.assert_array_equal(keep[2], x["valid"][2])  # 4 tokens <= B: no eviction
        assert not np.any(keep & ~x["valid"])
    per_layer = AhaKV(budget=P.PerLayer(P.Tokens(6)), recent=2, value_prior="l2_normalized")
    keep = np.asarray(select_j(per_layer, score_j(per_layer, x), x["valid"]))
    np.testing.assert_array_equal(keep.sum((-2, -1)), np.minimum(x["valid"].sum((-2, -1)), 12))
    everything = np.asarray(keep_j(AhaKV(budget=P.Tokens(12), recent=2), x))
    np.testing.assert_array_equal(everything, x["valid"])  # I1
    assert AhaKV(budget=P.Tokens(1)).recent_for(12) == 1  # the window is never empty


@pytest.mark.parametrize("prior", ["l2", "l2_normalized"])
def test_a5_value_scaling_keeps_the_ranking_and_zero_values_go_first(prior):
    x = with_values(make_inputs(6, lengths=(12, 12), pad="left"), 6)
    policy = AhaKV(budget=P.Tokens(8), recent=3, value_prior=prior, ref_len=4)
    s = np.asarray(score_j(policy, x))
    scaled = dict(x, v=x["v"] * 3.7)
    s_scaled = np.asarray(score_j(policy, scaled))
    finite = np.isfinite(s)
    close(s_scaled[finite], s[finite] * (3.7 if prior == "l2" else 1.0))
    np.testing.assert_array_equal(np.asarray(keep_j(policy, scaled)), np.asarray(keep_j(policy, x)))
    zero = dict(x, v=x["v"].copy())
    zero["v"][:, :, 5] = 0.0  # slot 5 = position 5, not in the recent window
    s_zero = np.asarray(score_j(policy, zero))
    np.testing.assert_array_equal(s_zero[:, :, 5], 0.0)
    keep = np.asarray(keep_j(AhaKV(budget=P.Tokens(11), recent=3, value_prior=prior, ref_len=4), zero))
    np.testing.assert_array_equal(np.nonzero(~keep)[2], [5, 5, 5, 5])  # the only one evicted, every head


# ---------------------------------------------------------------------------------------------
# A4 gain, A6 positional bias (seeded statistics on i.i.d. Gaussian inputs)
# ---------------------------------------------------------------------------------------------


def causal_gaussian(seed, n, kv, g, e=16):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, kv, n, e)).astype(np.float32)
    v = rng.standard_normal((1, kv, n, e)).astype(np.float32)
    q = rng.standard_normal((1, n, kv, g, e)).astype(np.float32)
    pos = np.broadcast_to(np.arange(n, dtype=np.int32), (1, kv, n))
    return dict(k=k, v=v, q=q, pos=pos, q_pos=pos[:, 0], valid=np.ones((1, kv, n), bool))


def test_a4_gain_is_monotone_and_one_up_to_ref_len():
    pos = np.arange(-2, 5000, dtype=np.int32)[None]
    log_gain = np.asarray(step_gain(pos, gain="log", ref_len=64))[0]
    step = np.asarray(step_gain(pos, gain="step", ref_len=64))[0]
    for lam in (log_gain, step):
        assert np.all(np.diff(lam) >= 0) and np.all(lam >= 1.0)
        np.testing.assert_array_equal(lam[: 64 + 2], 1.0)  # padding and positions 0 .. ref_len - 1
    assert log_gain[64 + 2] > 1.0 and np.all(step <= log_gain + 1e-6)
    close(log_gain[4095 + 2], 2.0)  # log 4096 / log 64
    np.testing.assert_array_equal(np.asarray(step_gain(pos, gain="none"))[0], 1.0)
    for p in (126, 127, 128, 255, 256, 1023):
        close(step[p + 2], np_gain(p, "step", 64))


def test_a4_gain_flattens_the_entropy_growth():
    """Mean row entropy vs log(i + 1) past ref_len: slope ~1 with lambda = 1, far smaller with SG."""
    n, ref_len = 256, 16
    x = causal_gaussian(0, n, kv=1, g=8)
    slopes = {}
    for gain in ("none", "log", "step"):
        p_gtn = np.asarray(sg_probs_j(x["q"], x["q_pos"], x["k"], x["pos"], x["valid"], gain=gain, ref_len=ref_len))
        p_gtn = p_gtn[0, 0].astype(np.float64)
        h_t = -np.sum(p_gtn * np.log(np.where(p_gtn > 0, p_gtn, 1.0)), axis=-1).mean(0)
        t = np.arange(ref_len - 1, n)
        slopes[gain] = np.polyfit(np.log(t + 1.0), h_t[t], 1)[0]
    assert slopes["none"] > 0.8
    assert abs(slopes["log"]) < 0.7 * slopes["none"] and abs(slopes["step"]) < 0.8 * slopes["none"]


def ks_uniform(x01):
    """Kolmogorov-Smirnov distance of a sample in [0, 1) from the uniform distribution."""
    x = np.sort(x01)
    m = len(x)
    i = np.arange(1, m + 1)
    return max(np.max(i / m - x), np.max(x - (i - 1) / m))


def test_a6_retained_positions_spread_over_the_context_unlike_h2o():
    """i.i.d. inputs: AhaKV's kept candidates are ~uniform over [0, n - r) (KS distance small); H2O's
    pile up at the start (KS distance large)."""
    n, recent, budget = 192, 24, 48
    x = causal_gaussian(1, n, kv=8, g=2)
    cand = x["pos"] < n - recent
    dist = {}
    for name, policy in [
        ("ahakv", AhaKV(budget=P.Tokens(budget), recent=recent, ref_len=16)),
        ("ra", AhaKV(budget=P.Tokens(budget), recent=recent, gain="none", value_prior="none")),
        ("h2o", P.H2O(budget=P.Tokens(budget), recent=recent)),
    ]:
        keep = np.asarray(keep_j(policy, x))
        kept = x["pos"][keep & cand]
        assert kept.size == 8 * (budget - recent)
        dist[name] = ks_uniform(kept / (n - recent))
    # 192 samples: the 0.1% critical value is ~1.95 / sqrt(192) = 0.14
    assert dist["ahakv"] < 0.14 and dist["ra"] < 0.14
    assert dist["h2o"] > 0.5


# ---------------------------------------------------------------------------------------------
# A7 decode bookkeeping
# ---------------------------------------------------------------------------------------------


def test_a7_incremental_sum_equals_recomputation_with_evictions():
    """Random rows and evictions for T steps: the running sum == the sum, over the last r rows, of the
    rows since each slot's current occupant arrived; a reused slot starts from the new row alone."""
    b, kv, c, r, steps = 2, 2, 6, 3, 11
    rng = np.random.default_rng(7)
    acc = RecentAccumulator(r)
    observe = jax.jit(acc.observe)
    state = acc.init(batch=b, heads=kv, slots=c)
    born = np.zeros((b, kv, c), int)
    rows = []
    for t in range(steps):
        evicted = np.where(rng.random((b, kv)) < 0.4, rng.integers(0, c, (b, kv)), -1).astype(np.int32)
        evicted[0, 0] = 2 if t == 5 else evicted[0, 0]  # at least one eviction inside a full window
        for bb, kk in zip(*np.nonzero(evicted >= 0), strict=True):
            born[bb, kk, evicted[bb, kk]] = t
        row = rng.dirichlet(np.ones(c), (b, kv)).astype(np.float32)
        rows.append(row)
        state = observe(state, row, evicted)
        want = np.zeros((b, kv, c))
        for s in range(max(0, t - r + 1), t + 1):
            want += np.where(born <= s, rows[s], 0.0)
        close(state.sum_bkc, want)
        close(acc.recompute(state), want)
        for bb, kk in zip(*np.nonzero(evicted >= 0), strict=True):
            close(state.sum_bkc[bb, kk, evicted[bb, kk]], row[bb, kk, evicted[bb, kk]])
    assert int(state.step) == steps
    assert state.rows_bkrc.shape == (b, kv, r, c)


def test_a7_decode_accumulation_equals_prefill_scores():
    """Decoding token by token over a full cache (slot = position), observing one SG row per step,
    gives the same scores as AhaKV scoring the whole sequence at once."""
    n, recent = 10, 4
    x = with_values(make_inputs(8, lengths=(n, n), n=n, pad="left"), 8)
    policy = AhaKV(budget=P.Tokens(6), recent=recent, ref_len=3, value_prior="l2_normalized", group="max")
    acc = policy.accumulator(n)
    assert acc.recent == recent
    row_j = jax.jit(lambda q, q_pos: policy.rows(pos=x["pos"], valid=x["valid"], k=x["k"], q=q, q_pos=q_pos)[:, :, 0])
    observe = jax.jit(acc.observe)
    state = acc.init(batch=2, heads=2, slots=n)
    for t in range(n):
        state = observe(state, row_j(x["q"][:, t : t + 1], x["q_pos"][:, t : t + 1]))
    got = np.asarray(policy.decode_scores(state, pos=x["pos"], valid=x["valid"], v=x["v"]))
    close(got, np.asarray(score_j(policy, x)))


# ---------------------------------------------------------------------------------------------
# configuration and errors
# ---------------------------------------------------------------------------------------------


def test_policy_is_hashable_and_chains():
    a, b = AhaKV(budget=P.Tokens(6), gain="step"), AhaKV(budget=P.PerHead(P.Tokens(6)), gain="step")
    assert a == b and hash(a) == hash(b) and a.name == "ahakv"
    x = with_values(make_inputs(9, lengths=(12, 10), pad="left"), 9)
    keep = np.asarray(keep_j(P.Chain([P.Protect(sinks=2), AhaKV(budget=P.Tokens(6), recent=2)]), x))
    np.testing.assert_array_equal(keep.sum(-1), 6)
    assert np.all(keep[x["valid"] & (x["pos"] < 2)])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: AhaKV(budget=P.Tokens(4), recent=0), "recent=0"),
        (lambda: AhaKV(budget=P.Tokens(4), ref_len=1), "ref_len=1"),
        (lambda: AhaKV(budget=P.Tokens(4), gain="exp"), "'exp'"),
        (lambda: AhaKV(budget=P.Tokens(4), value_prior="l1"), "'l1'"),
        (lambda: AhaKV(budget=P.Tokens(4), group="min"), "'min'"),
        (lambda: AhaKV(), "needs a budget"),
        (lambda: AhaKV(budget=P.Threshold(0.1)), "recent="),
        (lambda: RecentAccumulator(0), "recent=0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_missing_arrays_and_bad_shapes_raise():
    x = with_values(make_inputs(10, lengths=(12, 12)), 10)
    with pytest.raises(ValueError, match="needs v="):
        AhaKV(budget=P.Tokens(4)).score(pos=x["pos"], valid=x["valid"], k=x["k"], q=x["q"], q_pos=x["q_pos"])
    no_v = AhaKV(budget=P.Tokens(4), value_prior="none")
    assert no_v.score(pos=x["pos"], valid=x["valid"], k=x["k"], q=x["q"], q_pos=x["q_pos"]).shape == (2, 2, 12)
    with pytest.raises(ValueError, match="needs q="):
        AhaKV(budget=P.Tokens(4)).score(pos=x["pos"], valid=x["valid"], k=x["k"], v=x["v"])
    with pytest.raises(ValueError, match=r"keeps 2 of 12 slots.*window=3"):
        keep_j(AhaKV(budget=P.Tokens(2), recent=3), x)
    acc = RecentAccumulator(2)
    with pytest.raises(ValueError, match=r"probs shape \(2, 2, 5\)"):
        acc.observe(acc.init(batch=2, heads=2, slots=6), np.zeros((2, 2, 5), np.float32))
