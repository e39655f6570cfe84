"""Cascading KV cache (reference/baselines.md section 4) against a plain-Python oracle of the
acceptance rule and against dense attention (invariants C1-C12 of section 6.4)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA

from wgkv_jax.cache.cascading import (
    CascadeAttend,
    CascadeConfig,
    CascadingCache,
    ema_update,
    push,
    query_positions,
    slot_positions,
)
from wgkv_jax.infer.generate import decode_loop, generate_ids, prefill_chunk
from wgkv_jax.infer.sampling import SamplingConfig
from wgkv_jax.model import init_params
from wgkv_jax.model.transformer import apply_rope, causal_self_attend, hidden_states, lm_head, rope_inv_freq

CFG = TINY_LLAMA  # 2 layers, 2 KV heads, groups of 2, head_dim 16


# ----------------------------------------------------------------------------- oracle


class Oracle:
    """Section 4.2 written out for one row and one head, slot by slot (pos, score)."""

    def __init__(self, c: CascadeConfig):
        self.c = c
        self.sinks: list[int] = []
        self.slots = [[None] * c.window for _ in range(c.cascades)]
        self.start = [0] * c.cascades
        self.fill = [0] * c.cascades
        self.seen = 0

    def push(self, pos: int, score: float) -> None:
        c = self.c
        if self.seen < c.sinks:
            self.sinks.append(pos)
            self.seen += 1
            return
        t = self.seen - c.sinks
        cand = (pos, score)
        for i in range(c.cascades):
            st, f = self.start[i], self.fill[i]
            if (c.eager_fill and t < c.cascades * c.window) or t % 2**i == 0:
                if f < c.window:
                    self.slots[i][(st + f) % c.window] = cand
                    self.fill[i] += 1
                    break
                cand, self.slots[i][st] = self.slots[i][st], cand
                self.start[i] = (st + 1) % c.window
                continue  # the popped token goes on (gone after the last cascade)
            if f == 0:
                self.slots[i][st] = cand
                self.fill[i] += 1
            else:
                r = (st - 1) % f  # the spec's "(pi_i - 1) mod f_i": the most recently written slot
                if cand[1] >= self.slots[i][r][1]:
                    self.slots[i][r] = cand
            break
        self.seen += 1

    def pos_slots(self) -> np.ndarray:
        sinks = self.sinks + [-1] * (self.c.sinks - len(self.sinks))
        cas = [-1 if x is None else x[0] for row in self.slots for x in row]
        return np.asarray(sinks + cas)

    def score_slots(self) -> np.ndarray:
        cas = [0.0 if x is None else x[1] for row in self.slots for x in row]
        return np.asarray([0.0] * self.c.sinks + cas, np.float32)


def _layer_view(batch: int, ccfg: CascadeConfig, heads: int = 2, dim: int = 4) -> CascadingCache:
    cfg = dataclasses.replace(CFG, n_layers=1, n_kv_heads=heads, head_dim=dim)
    return CascadingCache.zeros(cfg, batch, ccfg).layer(0)


@functools.partial(jax.jit, static_argnames=("ccfg", "chunk"))
def _push_chunks(view, k_btke, v_btke, s_btk, pos_bt, ccfg, chunk):
    """Push the stream in chunks of `chunk` tokens; returns the view and (start, fill) after each chunk."""

    def step(view, xs):
        view = push(view, *(jnp.swapaxes(x, 0, 1) for x in xs), ccfg)
        return view, (view.start, view.fill)

    xs = tuple(
        jnp.swapaxes(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 0, 1) for x in (k_btke, v_btke, s_btk, pos_bt)
    )
    xs = tuple(jnp.swapaxes(x, 1, 2) for x in xs)  # [chunks, chunk, B, ...] -> push wants [B, chunk, ...]
    return jax.lax.scan(step, view, xs)


def _random_stream(rng, batch, n, heads, lengths):
    """Left-padded rows (row b has lengths[b] tokens at positions 0..), tied scores from a small set."""
    pos_bt = np.stack([np.arange(n) - (n - ln) for ln in lengths]).astype(np.int32)
    pos_bt[pos_bt < 0] = -1
    s_btk = (rng.integers(0, 4, (batch, n, heads)) / 4).astype(np.float32)
    k_btke = np.broadcast_to((pos_bt[:, :, None] * 10 + np.arange(heads))[..., None], (batch, n, heads, 4))
    return k_btke.astype(np.float32), (-k_btke).astype(np.float32), s_btk, pos_bt


CONFIGS = [
    CascadeConfig(window=4, cascades=1, sinks=2),  # C1: StreamingLLM
    CascadeConfig(window=3, cascades=3, sinks=2),
    CascadeConfig(window=2, cascades=4, sinks=0, eager_fill=False),
]


@pytest.mark.parametrize("ccfg", CONFIGS, ids=lambda c: f"C{c.cascades}W{c.window}S{c.sinks}e{int(c.eager_fill)}")
def test_push_matches_oracle(ccfg):
    """C3, C4, C5, C6, C8, C9, C12 and padding: jnp push == oracle slot for slot, chunked == one by one."""
    rng = np.random.default_rng(ccfg.window)
    n, heads, chunk = 120, 2, 5
    lengths = [n, n, n - 37]  # rows 0 and 1 differ in scores only; row 2 is left-padded
    k, v, s, pos = _random_stream(rng, 3, n, heads, lengths)
    view0 = _layer_view(3, ccfg, heads)
    view, _ = _push_chunks(view0, k, v, s, pos, ccfg, chunk)
    one, (start_tbc, fill_tbc) = _push_chunks(view0, k, v, s, pos, ccfg, 1)
    for a, b in zip(jax.tree.leaves(view), jax.tree.leaves(one), strict=True):  # C9
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    for b in range(3):
        for h in range(heads):
            o = Oracle(ccfg)
            for t in range(n):
                if pos[b, t] >= 0:
                    o.push(int(pos[b, t]), float(s[b, t, h]))
            np.testing.assert_array_equal(np.asarray(view.pos[b, h]), o.pos_slots())  # C12 via ties
            np.testing.assert_array_equal(np.asarray(view.score[b, h]), o.score_slots())
            np.testing.assert_array_equal(np.asarray(view.start[b]), o.start)
            np.testing.assert_array_equal(np.asarray(view.fill[b]), o.fill)
            live = o.pos_slots() >= 0
            np.testing.assert_array_equal(np.asarray(view.k[b, h, live, 0]), o.pos_slots()[live] * 10 + h)
            # C3 / C4: full capacity, sinks are the first S tokens, no token twice
            assert live.sum() == ccfg.capacity
            np.testing.assert_array_equal(o.pos_slots()[: ccfg.sinks], np.arange(ccfg.sinks))
            assert len(set(o.pos_slots()[live])) == live.sum()
            # C5: in-cache positions are contiguous and follow the original order
            sp = np.asarray(slot_positions(view.start[b], view.fill[b], ccfg, view.seen[b]))
            order = np.argsort(sp[live])
            np.testing.assert_array_equal(np.sort(sp[live]), np.arange(live.sum()))
            assert np.all(np.diff(o.pos_slots()[live][order]) > 0)
    # C8: the layout depends on the token count only
    np.testing.assert_array_equal(np.asarray(view.start[0]), np.asarray(view.start[1]))
    if ccfg.cascades == 1:  # C1: sinks + the last W tokens
        np.testing.assert_array_equal(np.sort(np.asarray(view.pos[0, 0])), [0, 1, *range(n - ccfg.window, n)])

    # C6: after warm-up, cascade i's pointer moves exactly at t = 0 mod 2^i
    start_tc = np.asarray(start_tbc[:, 0])
    full_t = np.asarray(fill_tbc[:, 0]).min(axis=1) == ccfg.window
    t_non_sink = np.arange(n) - ccfg.sinks
    moved_tc = start_tc != np.roll(start_tc, 1, axis=0)
    warm = np.flatnonzero(full_t)[0] + 1
    for i in range(ccfg.cascades):
        expect = t_non_sink[warm:] % 2**i == 0
        if ccfg.window == 1:
            continue
        np.testing.assert_array_equal(moved_tc[warm:, i], expect)


# ----------------------------------------------------------------------------- EMA


def test_ema_bounds_convergence_and_replay():
    """C10: sigma stays in [0, 1], converges to a constant abar, and a chunk update of the existing
    slots equals replaying its queries one at a time; new tokens follow section 4.3 exactly."""
    rng = np.random.default_rng(0)
    b, k, n, t, beta = 2, 2, 6, 5, 0.7
    valid_bt = jnp.asarray([[True] * t, [False, False, True, True, True]])
    abar_btkn = jnp.asarray(rng.uniform(0, 1, (b, t, k, n)), jnp.float32)
    abar_btku = jnp.asarray(rng.uniform(0, 1, (b, t, k, t)), jnp.float32)
    sigma = jnp.asarray(rng.uniform(0, 1, (b, k, n)), jnp.float32)
    chunk, new_buk = ema_update(sigma, abar_btkn, abar_btku, valid_bt, beta)
    replay = sigma
    for u in range(t):
        replay, _ = ema_update(
            replay, abar_btkn[:, u : u + 1], abar_btku[:, u : u + 1, :, u : u + 1], valid_bt[:, u : u + 1], beta
        )
    np.testing.assert_allclose(chunk, replay, rtol=1e-6)
    ref = np.zeros((b, t, k))
    for r in range(b):
        idx = np.flatnonzero(np.asarray(valid_bt[r]))
        for j, u0 in enumerate(idx):
            for i, u in enumerate(idx[j:]):
                ref[r, u0] += (1 - beta) * beta**i * np.asarray(abar_btku[r, u, :, u0])
    np.testing.assert_allclose(new_buk, ref, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(new_buk)[~np.asarray(valid_bt)] == 0)

    s = jnp.zeros((1, 1, 3))
    for _ in range(80):
        a = jnp.asarray(rng.uniform(0, 1, (1, 4, 1, 3)), jnp.float32)
        s, _ = ema_update(s, a, jnp.zeros((1, 4, 1, 4)), jnp.ones((1, 4), bool), 0.9)
        assert np.all((np.asarray(s) >= 0) & (np.asarray(s) <= 1))
    s = jnp.zeros((1, 1, 1))
    for _ in range(60):
        s, _ = ema_update(s, jnp.full((1, 4, 1, 1), 0.3), jnp.zeros((1, 4, 1, 4)), jnp.ones((1, 4), bool), 0.9)
    np.testing.assert_allclose(s, 0.3, rtol=1e-5)
    # beta = 0.9999999 is not lost to float32 rounding (exp of n log beta)
    s, _ = ema_update(
        jnp.ones((1, 1, 1)), jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1)), jnp.ones((1, 1), bool), 0.9999999
    )
    assert float(s[0, 0, 0]) == float(np.float32(1 - 1e-7)) < 1.0


# ----------------------------------------------------------------------------- attention hook


def _rope_np(x, pos, inv):
    ang = pos[..., None] * inv
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


@functools.partial(jax.jit, static_argnames=("attend",))
def _attend_step(cache, q_pre, k_pre, v, pos_bt, attend):
    inv = rope_inv_freq(attend.cfg)
    q = apply_rope(q_pre, pos_bt, inv)
    k = apply_rope(k_pre, pos_bt, inv)
    return attend(cache, jnp.int32(0), None, q, k_pre, k, v, pos_bt)


def _attend_stream(attend, q, k, v, pos, n_prefill, chunk):
    cfg1 = dataclasses.replace(CFG, n_layers=1)
    cache = CascadingCache.zeros(cfg1, q.shape[0], attend.ccfg)
    outs, max_pos = [], 0
    steps = [(c, c + chunk) for c in range(0, n_prefill, chunk)] + [(i, i + 1) for i in range(n_prefill, q.shape[1])]
    for lo, hi in steps:
        qp = np.asarray(query_positions(cache.layer(0), jnp.asarray(pos[:, lo:hi]), attend.ccfg))
        max_pos = max(max_pos, qp.max())
        before = cache
        out, cache = _attend_step(cache, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], pos[:, lo:hi], attend)
        outs.append(np.asarray(out))
    return np.concatenate(outs, axis=1), cache, before, max_pos


@pytest.mark.parametrize("mode", ["in_cache", "original"])
def test_attend_stream_padding_and_reference(mode):
    """Past the span: a left-padded batch == each row alone; C11; the last decode step equals a
    numpy softmax over the retained tokens rotated at their mode's positions, and the EMA of
    each slot moves by (1 - beta) * (max over the group of its probability)."""
    ccfg = CascadeConfig(window=3, cascades=2, sinks=2, positions=mode, beta=0.9)
    attend = CascadeAttend(ccfg, CFG)
    rng = np.random.default_rng(1)
    b, n, n_prefill, chunk, kh, g, e = 2, 40, 24, 4, CFG.n_kv_heads, CFG.group_size, CFG.head_dim
    lengths = [n, n - 6]
    pos = np.stack([np.arange(n) - (n - ln) for ln in lengths]).astype(np.int32)
    pos[pos < 0] = -1
    q = rng.normal(size=(b, n, kh, g, e)).astype(np.float32)
    k = rng.normal(size=(b, n, kh, e)).astype(np.float32)
    v = rng.normal(size=(b, n, kh, e)).astype(np.float32)
    out, cache, before, max_pos = _attend_stream(attend, q, k, v, pos, n_prefill, chunk)
    assert max_pos <= ccfg.capacity + chunk - 1  # C11: S + N_cap + T - 1
    if mode == "in_cache":
        assert max_pos == ccfg.capacity + chunk - 1
    # row 1 alone: drop its pads (its 6 leading pads fill the first chunk and a half)
    lo = 6 - 6 % chunk  # keep chunk alignment: row 1's own padding in whole chunks
    out1, cache1, _, _ = _attend_stream(attend, q[1:, lo:], k[1:, lo:], v[1:, lo:], pos[1:, lo:], n_prefill - lo, chunk)
    valid = pos[1, lo:] >= 0
    np.testing.assert_allclose(out[1, lo:][valid], out1[0][valid], atol=1e-5)
    for a, a1 in zip(jax.tree.leaves(cache), jax.tree.leaves(cache1), strict=True):
        np.testing.assert_allclose(np.asarray(a)[:, 1], np.asarray(a1)[:, 0], atol=1e-6)

    # the last step of row 0 against numpy, from the cache before it
    inv = rope_inv_freq(CFG)
    view = jax.tree.map(lambda x: np.asarray(x[0]), before)
    t_last = n - 1
    out_ref = np.zeros((kh, g, e))
    for h in range(kh):
        live = np.flatnonzero(view.pos[0, h] >= 0)
        live = live[np.argsort(view.pos[0, h, live])]
        kpos = np.arange(len(live)) if mode == "in_cache" else view.pos[0, h, live]
        qpos = len(live) if mode == "in_cache" else t_last
        keys = np.concatenate(
            [_rope_np(view.k[0, h, live], kpos, inv), _rope_np(k[0, t_last, h][None], np.array([qpos]), inv)]
        )
        vals = np.concatenate([view.v[0, h, live], v[0, t_last, h][None]])
        sc = _rope_np(q[0, t_last, h], np.full(g, qpos), inv) @ keys.T / np.sqrt(e)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out_ref[h] = p @ vals
        want = 0.9 * view.score[0, h, live] + 0.1 * p[:, :-1].max(0)
        # every retained non-sink token (wherever the push moved it) carries its updated EMA
        after_pos, after_score = np.asarray(cache.pos[0, 0, h]), np.asarray(cache.score[0, 0, h])
        checked = 0
        for j, slot in enumerate(live):
            moved = np.flatnonzero(after_pos == view.pos[0, h, slot])
            if slot >= ccfg.sinks and moved.size:
                np.testing.assert_allclose(after_score[moved[0]], want[j], rtol=1e-4, atol=1e-6)
                checked += 1
        assert checked >= ccfg.cascade_slots - 2
    np.testing.assert_allclose(out[0, t_last], out_ref, atol=2e-5)


# ----------------------------------------------------------------------------- C2: short == dense


@functools.partial(jax.jit, static_argnames=("attend",))
def _run(params, cache, tokens_bt, pos_bt, attend):
    h, cache = hidden_states(params, CFG, tokens_bt, pos_bt, attend=attend, state=cache)
    return lm_head(params, CFG, h), cache


@pytest.fixture(scope="module")
def sharp():
    params = init_params(CFG, jax.random.PRNGKey(0))
    return dict(params, lm_head=params["lm_head"] * 30)


@pytest.mark.parametrize("mode", ["in_cache", "original"])
def test_short_sequence_equals_dense(sharp, mode):
    """C2: n <= S + C * W tokens (chunked prefill of a left-padded prompt, then decode) give the
    dense causal logits within 1e-4, float32."""
    ccfg = CascadeConfig(window=4, cascades=3, sinks=2, positions=mode)
    attend = CascadeAttend(ccfg, CFG)
    n, n_prefill, chunk, pad = ccfg.capacity, 10, 4, 2
    toks = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (1, n), 0, CFG.vocab_size), np.int32)
    dense, _ = _run(sharp, None, toks, np.arange(n, dtype=np.int32)[None], causal_self_attend)
    ptoks = np.concatenate([np.zeros((1, pad), np.int32), toks[:, :n_prefill]], axis=1)
    ppos = (np.arange(n_prefill + pad) - pad)[None].astype(np.int32)
    cache = CascadingCache.zeros(CFG, 1, ccfg)
    got = []
    for c in range(0, n_prefill + pad, chunk):
        out, cache = _run(sharp, cache, ptoks[:, c : c + chunk], ppos[:, c : c + chunk], attend)
        got.append(np.asarray(out[0]))
    for i in range(n_prefill, n):
        out, cache = _run(sharp, cache, toks[:, i : i + 1], np.array([[i]], np.int32), attend)
        got.append(np.asarray(out[0]))
    got = np.concatenate(got)[pad:]
    np.testing.assert_allclose(got, np.asarray(dense[0]), atol=1e-4, rtol=1e-4)
    assert int(cache.seen[0, 0]) == n and int(jnp.sum(cache.pos[0, 0, 0] >= 0)) == n


def test_generation_equals_full_cache(sharp):
    """C2 through the generation loop: chunked prefill + decode_loop with CascadeAttend reproduce
    the full cache's greedy tokens while everything fits."""
    ccfg = CascadeConfig.for_budget(20, cascades=2, sinks=2)
    attend = CascadeAttend(ccfg, CFG)
    prompts = [[5, 9, 3, 7, 1, 2, 8, 4, 6, 11, 12], [3, 1, 4, 1, 5, 9]]
    max_new, chunk, t_pad = 6, 4, 12
    want, _, _ = generate_ids(sharp, CFG, prompts, max_new_tokens=max_new)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    toks = np.zeros((2, t_pad), np.int32)
    for i, p in enumerate(prompts):
        toks[i, t_pad - len(p) :] = p
    pos = (np.arange(t_pad)[None] - (t_pad - lengths)[:, None]).astype(np.int32)
    cache, key, sampling = CascadingCache.zeros(CFG, 2, ccfg), jax.random.PRNGKey(0), SamplingConfig()
    for c in range(0, t_pad, chunk):
        first, cache = prefill_chunk(
            sharp, CFG, cache, toks[:, c : c + chunk], pos[:, c : c + chunk], key, sampling, attend
        )
    out, cache = decode_loop(sharp, CFG, cache, first, lengths, key, sampling, max_new, (), jnp.int32(max_new), attend)
    assert np.asarray(out).tolist() == want
    assert np.asarray(cache.seen[0]).tolist() == (lengths + max_new - 1).tolist()


# ----------------------------------------------------------------------------- config


def test_config_sizes_and_errors():
    c = CascadeConfig.for_budget(100, cascades=4, sinks=4)
    assert (c.window, c.capacity, c.span) == (24, 100, 24 * 15)
    assert CascadeConfig.for_budget(101).capacity == 100
    cache = CascadingCache.zeros(CFG, 3, c, jnp.bfloat16)
    assert cache.k.shape == (2, 3, 2, 100, 16) and cache.start.shape == (2, 3, 4)
    assert cache.kv_nbytes == 2 * 2 * 3 * 2 * 100 * 16 * 2 and cache.nbytes > cache.kv_nbytes
    axes = CascadingCache.logical_axes()
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(cache)
    hash(c)
    bad = [
        (dict(window=0), "window=0"),
        (dict(window=2.5), "window=2.5"),
        (dict(window=4, cascades=0), "cascades=0"),
        (dict(window=4, cascades=31), "cascades=31"),
        (dict(window=4, sinks=-1), "sinks=-1"),
        (dict(window=4, beta=1.0), "beta=1.0"),
        (dict(window=4, positions="rope"), "positions='rope'"),
        (dict(window=4, head_reduce="median"), "head_reduce='median'"),
        (dict(window=4, eager_fill=1), "eager_fill=1"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            CascadeConfig(**kw)
    with pytest.raises(ValueError, match="budget of 7 slots"):
        CascadeConfig.for_budget(7, cascades=4, sinks=4)
