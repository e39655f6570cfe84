"""The WG-KV dual cache against the dense masked reference (reference/wgkv.md invariants 10-17).

Teacher-forced runs: the sequence is left-padded to whole chunks, prefilled chunk by chunk,
then decoded one token at a time; the logits at every position must equal the dense float32
attention with mask A_i = {j <= i : i - j < W} U {j <= i - W : admitted_j}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA, TINY_QWEN3
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from wgkv_jax import gates
from wgkv_jax.cache import (
    CacheConfig,
    CapacityError,
    DualAttend,
    DualCache,
    FixedAdmission,
    GateAdmission,
    KVCache,
    ReferenceAttend,
    prefill_attend,
    reference_logits,
)
from wgkv_jax.infer.generate import generate_ids
from wgkv_jax.model import forward, init_params, param_logical_axes
from wgkv_jax.model.transformer import hidden_states, lm_head
from wgkv_jax.train.evaluate import AdmissionAttend

CFG = TINY_LLAMA  # 4 query heads over 2 KV heads: GQA groups of 2
TOL = 2e-5


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def sharp(params):
    """The same model with a 30x output head: wide logit gaps, so greedy choices never hinge on
    float rounding (a random tiny model's logits are otherwise nearly tied)."""
    return dict(params, lm_head=params["lm_head"] * 30)


@functools.partial(jax.jit, static_argnames=("cfg", "attend"))
def _run(params, cfg, cache, tokens_bt, pos_bt, attend):
    h_btd, cache = hidden_states(params, cfg, tokens_bt, pos_bt, attend=attend, state=cache)
    return lm_head(params, cfg, h_btd), cache


def run_dual(
    params, cfg, tokens, admission, *, window, capacity, chunk, n_prefill, defer=False, cache=None, batched=False
):
    """Logits [T, V] of one row: prefill of the first n_prefill tokens in chunks, then decode steps."""
    tokens = np.asarray(tokens, np.int32)
    pad = -n_prefill % chunk
    toks = np.concatenate([np.zeros(pad, np.int32), tokens[:n_prefill]])[None]
    pos = (np.arange(toks.shape[1]) - pad)[None].astype(np.int32)
    if cache is None:
        cache = DualCache.zeros(cfg, 1, window, capacity, chunk=chunk, defer=defer)
    logits = []
    for c in range(0, toks.shape[1], chunk):
        out, cache = _run(params, cfg, cache, toks[:, c : c + chunk], pos[:, c : c + chunk], DualAttend(admission))
        logits.append(out[0])
    step = DualAttend(admission, defer_gating=defer, batched_promotion=batched)
    for i in range(n_prefill, len(tokens)):
        cache = step.before_decode(cache, np.array([i], np.int32))
        out, cache = _run(params, cfg, cache, tokens[None, i : i + 1], np.array([[i]], np.int32), step)
        logits.append(out[0])
    return jnp.concatenate(logits)[pad:], cache


def rand_tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).astype(np.int32)


def reference(params, tokens, admission, window, cfg=CFG):
    logits, bits = reference_logits(params, cfg, jnp.asarray(tokens)[None], admission, window)
    return logits[0], bits[:, 0]


# ----------------------------------------------------------------------------- invariants 11-15, 17


@pytest.mark.parametrize(
    "t, window, chunk, n_prefill, mode",
    [
        (40, 8, 16, 32, "all"),  # ring wraps many times in prefill and decode; chunk > W
        (40, 8, 16, 32, "none"),
        (40, 8, 16, 32, "random"),
        (12, 16, 16, 5, "random"),  # T < W: the ring never fills
        (45, 16, 8, 16, "random"),  # chunk < W; decode crosses slot W - 1 and wraps
        (30, 8, 32, 1, "random"),  # one-token prompt, then all decode
    ],
)
def test_prefill_and_decode_equal_dense_reference(params, t, window, chunk, n_prefill, mode):
    tokens = rand_tokens(t, seed=t)
    admission = FixedAdmission(mode, rate=0.35, seed=3)
    got, cache = run_dual(params, CFG, tokens, admission, window=window, capacity=64, chunk=chunk, n_prefill=n_prefill)
    want, bits = reference(params, tokens, admission, window)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    # invariant 10/14/15: every admitted token that left the window is stored, nothing else
    expect_len = np.asarray(bits[..., : max(t - window, 0)].sum(-1))
    np.testing.assert_array_equal(np.asarray(cache.length[:, 0]), expect_len)
    assert int(cache.evicted.sum()) == 0


def test_all_admitted_equals_full_model(params):
    tokens = rand_tokens(50, seed=1)
    got, cache = run_dual(params, CFG, tokens, FixedAdmission("all"), window=8, capacity=64, chunk=16, n_prefill=20)
    np.testing.assert_allclose(got, forward(params, CFG, jnp.asarray(tokens)[None])[0], atol=TOL, rtol=TOL)
    assert (np.asarray(cache.length) == 50 - 8).all()  # memory = all T tokens: W local + T - W global


def test_none_admitted_equals_window_attention(params):
    """Against the independent blocked soft-gate path (local-only admission)."""
    tokens = rand_tokens(48, seed=2)
    got, cache = run_dual(params, CFG, tokens, FixedAdmission("none"), window=16, capacity=64, chunk=16, n_prefill=17)
    h, _ = hidden_states(
        params,
        CFG,
        jnp.asarray(tokens)[None],
        jnp.arange(48, dtype=jnp.int32)[None],
        attend=AdmissionAttend("local", 16, block=16),
        state=jnp.zeros((CFG.n_layers, 1, CFG.n_kv_heads, 48), bool),
    )
    np.testing.assert_allclose(got, lm_head(params, CFG, h)[0], atol=1e-4, rtol=1e-4)
    assert int(cache.length.sum()) == 0


def test_qk_norm_model_matches_reference():
    cfg = TINY_QWEN3
    p = init_params(cfg, jax.random.PRNGKey(5))
    tokens = rand_tokens(33, seed=5)
    admission = FixedAdmission("random", rate=0.5, seed=9)
    got, _ = run_dual(p, cfg, tokens, admission, window=8, capacity=32, chunk=8, n_prefill=20)
    want, _ = reference(p, tokens, admission, 8, cfg=cfg)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


# ----------------------------------------------------------------------------- invariant 10


def test_prefill_write_contents(params):
    """Ring = the last tokens at slot p mod R; global = admitted older tokens, in order, post-RoPE."""
    t, w = 37, 8
    tokens = rand_tokens(t, seed=4)
    admission = FixedAdmission("random", rate=0.4, seed=1)
    _, cache = run_dual(params, CFG, tokens, admission, window=w, capacity=32, chunk=16, n_prefill=t)
    ref_attend = ReferenceAttend(admission, w)

    def record(state, layer, p, q, k_pre, k, v, pos):  # reference attention; keep every layer's K/V
        out, _ = ref_attend(None, layer, p, q, k_pre, k, v, pos)
        _, state = prefill_attend(state, layer, p, q, k_pre, k, v, pos)  # writes K/V at slot == position
        return out, state

    full = KVCache.zeros(CFG, 1, 64)
    _, full = hidden_states(params, CFG, jnp.asarray(tokens)[None], jnp.arange(t)[None], attend=record, state=full)
    _, bits = reference(params, tokens, admission, w)
    for p in range(t - w, t):
        slot = p % cache.ring_size
        np.testing.assert_allclose(cache.ring_k[:, 0, :, slot], full.k[:, 0, :, p], atol=1e-6)
        np.testing.assert_allclose(cache.ring_v[:, 0, :, slot], full.v[:, 0, :, p], atol=1e-6)
    for l in range(CFG.n_layers):
        for k in range(CFG.n_kv_heads):
            want_pos = np.flatnonzero(np.asarray(bits[l, k, : t - w]))
            n = int(cache.length[l, 0, k])
            assert n == len(want_pos)
            np.testing.assert_array_equal(np.asarray(cache.glob_pos[l, 0, k, :n]), want_pos)
            assert (np.asarray(cache.glob_pos[l, 0, k, n:]) == -1).all()
            np.testing.assert_allclose(cache.glob_k[l, 0, k, :n], full.k[l, 0, k, want_pos], atol=1e-6)
            np.testing.assert_allclose(cache.glob_v[l, 0, k, :n], full.v[l, 0, k, want_pos], atol=1e-6)


# ----------------------------------------------------------------------------- invariant 13 (property)


@settings(
    max_examples=8,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: a failure prints its inputs at once
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    t=st.integers(2, 60),
    window=st.sampled_from([4, 8, 16]),
    chunk=st.sampled_from([4, 8, 32]),
    capacity=st.sampled_from([8, 64]),
    rate=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_chunked_prefill_decode_match_reference(params, t, window, chunk, capacity, rate, seed):
    """Random lengths, W, chunk, C and masks: prefill(T - 1) + decode == dense reference, and
    == prefill(T) at the last position; with a small C the store keeps the best-scored entries."""
    tokens = rand_tokens(t, seed=seed)
    admission = FixedAdmission("random", rate=rate, seed=seed)
    kw = dict(window=window, capacity=capacity, chunk=chunk)
    decoded, c1 = run_dual(params, CFG, tokens, admission, n_prefill=t - 1, **kw)
    prefilled, c2 = run_dual(params, CFG, tokens, admission, n_prefill=t, **kw)
    want, bits = reference(params, tokens, admission, window)
    need = np.asarray(bits[..., : max(t - window, 0)].sum(-1))
    # the kept set is the top-C by score whatever the chunking (the order of promotions)
    for name in ("length", "evicted"):
        np.testing.assert_array_equal(np.asarray(getattr(c1, name)), np.asarray(getattr(c2, name)))
    np.testing.assert_array_equal(np.sort(np.asarray(c1.glob_pos), -1), np.sort(np.asarray(c2.glob_pos), -1))
    if need.max(initial=0) <= capacity:  # without eviction both equal the exact semantics
        np.testing.assert_allclose(decoded[-1], prefilled[-1], atol=TOL, rtol=TOL)
        np.testing.assert_allclose(decoded, want, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(prefilled, want, atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(np.asarray(c1.length[:, 0]), np.minimum(need, capacity))
    np.testing.assert_array_equal(np.asarray(c1.evicted[:, 0]), need - np.minimum(need, capacity))


@pytest.mark.parametrize("defer, capacity", [(False, 64), (True, 5)])
def test_batched_promotion_equals_per_layer(params, defer, capacity):
    """Decode steps that promote every layer's leaving token up front (one set of ops per step)
    leave the same cache and logits as per-layer promotion, also under deferred gating and eviction."""
    tokens = rand_tokens(44, seed=11)
    admission = FixedAdmission("random", rate=0.5, seed=4)
    kw = dict(window=8, capacity=capacity, chunk=8, n_prefill=10, defer=defer)
    want, c1 = run_dual(params, CFG, tokens, admission, **kw)
    got, c2 = run_dual(params, CFG, tokens, admission, batched=True, **kw)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert capacity > 8 or int(c1.evicted.sum()) > 0  # the small store really evicted


# ----------------------------------------------------------------------------- overflow


def test_overflow_keeps_highest_scores(params):
    t, w, cap = 60, 8, 6
    tokens = rand_tokens(t, seed=7)
    admission = FixedAdmission("random", rate=0.5, seed=2)
    _, cache = run_dual(params, CFG, tokens, admission, window=w, capacity=cap, chunk=16, n_prefill=40)
    pos = jnp.arange(t)[None]
    for l in range(CFG.n_layers):
        zeros = jnp.zeros((1, t, CFG.n_kv_heads, CFG.head_dim))
        admit, score = admission(l, None, zeros, zeros, zeros, pos)
        for k in range(CFG.n_kv_heads):
            cand = np.flatnonzero(np.asarray(admit[0, k, : t - w]))
            best = np.sort(cand[np.argsort(-np.asarray(score[0, k, cand]), kind="stable")[:cap]])
            kept = np.asarray(cache.glob_pos[l, 0, k])  # slot order is free after evictions
            np.testing.assert_array_equal(np.sort(kept), best)
            assert int(cache.evicted[l, 0, k]) == len(cand) - cap
            np.testing.assert_allclose(cache.glob_score[l, 0, k], score[0, k, kept])


def test_overflow_error_policy_raises(sharp):
    prompts = [rand_tokens(40, seed=1).tolist()]
    cache = CacheConfig(window=16, chunk=16, capacity=4, overflow="error")
    with pytest.raises(CapacityError, match=r"capacity is 4 per head"):
        generate_ids(sharp, CFG, prompts, max_new_tokens=4, cache=cache, admission=FixedAdmission("all"))
    # a store that fills only during decode stops the loop and raises too
    cache = CacheConfig(window=16, chunk=16, capacity=30, overflow="error")
    with pytest.raises(CapacityError, match="during decode"):
        generate_ids(sharp, CFG, prompts, max_new_tokens=12, cache=cache, admission=FixedAdmission("all"))


# ----------------------------------------------------------------------------- invariant 16


def test_deferred_gating_equals_per_token_gating(params):
    """A real (random-init) write gate; tau at the median score so both decisions occur."""
    gate = gates.make("wgkv", CFG)
    gparams = gates.init_stacked(gate, CFG, jax.random.PRNGKey(3))
    p = dict(params, layers=dict(params["layers"], gate=gparams))
    tokens = rand_tokens(70, seed=8)
    scores = []
    for l in range(CFG.n_layers):
        k = jax.random.normal(jax.random.PRNGKey(l), (1, 8, CFG.n_kv_heads, CFG.head_dim))
        scores.append(np.asarray(gate.apply({"params": jax.tree.map(lambda a, i=l: a[i], gparams)}, k, k, k)))
    admission = GateAdmission(gate, tau=float(np.median(np.concatenate([s.ravel() for s in scores]))))
    kw = dict(window=8, capacity=64, chunk=8, n_prefill=13)
    eager, c1 = run_dual(p, CFG, tokens, admission, **kw)
    deferred, c2 = run_dual(p, CFG, tokens, admission, defer=True, **kw)
    want, ref_bits = reference(p, tokens, admission, 8)
    np.testing.assert_allclose(eager, want, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(deferred, want, atol=TOL, rtol=TOL)
    assert 0 < int(c1.length.sum()) < ref_bits[..., : 70 - 8].size
    for name in ("length", "glob_pos"):
        np.testing.assert_array_equal(np.asarray(getattr(c1, name)), np.asarray(getattr(c2, name)))


# ----------------------------------------------------------------------------- generation


def test_dual_generation_all_admitted_equals_full_cache_batched(sharp):
    prompts = [rand_tokens(n, seed=n).tolist() for n in (5, 37, 20)]
    full, _, _ = generate_ids(sharp, CFG, prompts, max_new_tokens=10)
    cache = CacheConfig(window=16, chunk=16, capacity=48)  # room for every token
    dual, _, stats = generate_ids(sharp, CFG, prompts, max_new_tokens=10, cache=cache, admission=FixedAdmission("all"))
    assert dual == full
    s = stats["cache"]
    assert s.stored_entries == s.full_entries and s.evicted == 0


def test_dual_generation_batch_equals_rows_alone_and_streaming(sharp):
    prompts = [rand_tokens(n, seed=n + 1).tolist() for n in (3, 50, 23)]
    kw = dict(max_new_tokens=9, cache=CacheConfig(window=16, chunk=16), admission=FixedAdmission("random", 0.3))
    batched, _, stats = generate_ids(sharp, CFG, prompts, **kw)
    alone = [generate_ids(sharp, CFG, [p], **kw)[0][0] for p in prompts]
    assert batched == alone
    streamed, _, _ = generate_ids(sharp, CFG, prompts, on_token=lambda _: None, **kw)
    assert streamed == batched
    s = stats["cache"]
    seen = np.array([3 + 8, 50 + 8, 23 + 8])
    assert s.full_entries == seen.sum() * CFG.n_layers * CFG.n_kv_heads
    assert s.stored_entries < s.full_entries
    assert len(s.admission_per_layer) == CFG.n_layers and all(0 < r < 1 for r in s.admission_per_layer)


def test_dual_generation_compiles_once_per_bucket(sharp):
    import wgkv_jax.infer.generate as G

    kw = dict(max_new_tokens=4, cache=CacheConfig(window=16, chunk=16), admission=FixedAdmission("random", 0.3))
    generate_ids(sharp, CFG, [rand_tokens(20).tolist()], **kw)
    before = (G.prefill_chunk._cache_size(), G.decode_loop._cache_size())
    for n in (19, 20):  # the same prompt bucket (32) and capacity bucket (24 tokens in all)
        _, _, stats = generate_ids(sharp, CFG, [rand_tokens(n).tolist()], **kw)
        lengths = np.asarray(stats["cache"].global_lengths)
        assert lengths.shape == (CFG.n_layers, 1, CFG.n_kv_heads) and (lengths <= stats["capacity"]).all()
    assert (G.prefill_chunk._cache_size(), G.decode_loop._cache_size()) == before


def test_dual_generation_greedy_matches_dense_recomputation(sharp):
    """Greedy tokens from the cache loop == argmax of the dense reference re-run on the sequence."""
    admission = FixedAdmission("random", rate=0.3, seed=5)
    prompt = rand_tokens(30, seed=11).tolist()
    got, _, _ = generate_ids(
        sharp,
        CFG,
        [prompt],
        max_new_tokens=8,
        cache=CacheConfig(window=8, chunk=16, block=8, capacity=32),
        admission=admission,
    )
    seq = list(prompt)
    for _ in range(8):  # one compiled width: causality makes the zero padding irrelevant
        logits, _ = reference(sharp, np.asarray(seq + [0] * (40 - len(seq))), admission, 8)
        seq.append(int(jnp.argmax(logits[len(seq) - 1])))
    assert got[0] == seq[30:]


def test_dual_generation_sharded_equals_unsharded(sharp):
    from wgkv_jax import sharding

    prompts = [rand_tokens(n, seed=n + 2).tolist() for n in (7, 33, 18, 40)]
    kw = dict(max_new_tokens=6, cache=CacheConfig(window=16, chunk=16), admission=FixedAdmission("random", 0.4))
    want, _, ws = generate_ids(sharp, CFG, prompts, **kw)
    for data, model in ((4, 2), (2, 4)):
        mesh = sharding.make_mesh(data=data, model=model)
        sp = sharding.shard_tree(sharp, param_logical_axes(CFG), mesh)
        got, _, gs = generate_ids(sp, CFG, prompts, mesh=mesh, **kw)
        assert got == want, (data, model)
        assert gs["cache"].stored_entries == ws["cache"].stored_entries


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=24, block=16), r"window=24 must be a positive multiple of the kernel block size 16"),
        (dict(chunk=48), r"chunk=48 must be a power of two"),
        (dict(chunk=8), r"chunk=8 must be a positive multiple of the kernel block size 16"),
        (dict(capacity=0), r"capacity=0 must be >= 1"),
        (dict(capacity_fraction=1.5), r"capacity_fraction=1.5"),
        (dict(overflow="lru"), r"overflow='lru'"),
    ],
)
def test_cache_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_dual_needs_both_cache_and_admission(sharp):
    with pytest.raises(ValueError, match="needs both"):
        generate_ids(sharp, CFG, [[1, 2]], max_new_tokens=2, cache=CacheConfig())
    with pytest.raises(ValueError, match="unknown fixed admission"):
        FixedAdmission("most")


def test_capacity_resolution():
    from wgkv_jax.infer.generate import length_bucket

    assert [length_bucket(n) for n in (1, 8, 9, 17, 100, 4096, 4097)] == [1, 8, 9, 18, 104, 4096, 4608]
    assert CacheConfig(capacity=100).resolve_capacity(10_000) == 100
    assert CacheConfig(window=256, capacity_fraction=0.5, block=16).resolve_capacity(4096 + 256) == 2048
    assert CacheConfig(window=256).resolve_capacity(10) == 16  # never zero-sized


def test_gate_that_does_not_fit_the_model_is_refused(tmp_path, params):
    import dataclasses

    from wgkv_jax.api import Model, load_gate
    from wgkv_jax.train.checkpoint import export_gate_safetensors

    other = dataclasses.replace(CFG, n_layers=3, head_dim=8)
    gate = gates.make("wgkv", other)
    export_gate_safetensors(tmp_path / "g.safetensors", gates.init_stacked(gate, other, jax.random.PRNGKey(0)), {})
    model = Model(config=CFG, params=params)
    with pytest.raises(ValueError, match=r"3 layers, the model has 2 layers; .*head_dim 8, the model has head_dim 16"):
        load_gate(model, tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="no shipped gate"):
        load_gate(model, None)
    assert load_gate(model, "random:0.25").admission == FixedAdmission("random", rate=0.25)
    # a training output directory (gate.safetensors inside) loads like the file itself
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=r"directory without gate\.safetensors"):
        load_gate(model, run)
    fitting = gates.init_stacked(gates.make("wgkv", CFG), CFG, jax.random.PRNGKey(1))
    export_gate_safetensors(run / "gate.safetensors", fitting, {"config": {"window": 64, "gate": "wgkv"}})
    loaded = load_gate(model, run, tau=0.2)
    assert loaded.window == 64 and loaded.admission.tau == 0.2
    np.testing.assert_array_equal(loaded.params["w1"], fitting["w1"])
