"""Eviction policies on the dual cache (wgkv_jax.cache.evict) through generation.

The oracle is a dense forward without any cache that records, per layer, the policy's scores of
every prompt key from the same queries; the store kept after prefill must be that top-k
(reference/baselines.md invariants I1, I2, I6, I8, K1, K2, K5).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA

import wgkv_jax
from wgkv_jax import policies as P
from wgkv_jax.attention.reference import causal_mask, masked_attention
from wgkv_jax.cache import CacheConfig, FixedAdmission
from wgkv_jax.cache import evict as E
from wgkv_jax.infer.generate import generate_ids
from wgkv_jax.model import init_params
from wgkv_jax.model.transformer import hidden_states

CFG = TINY_LLAMA
W = 16
ALL = FixedAdmission("all")


@pytest.fixture(scope="module")
def sharp():
    params = init_params(CFG, jax.random.PRNGKey(0))
    return dict(params, lm_head=params["lm_head"] * 30)


def rand_tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).tolist()


def run(params, prompts, policy=None, admission=ALL, max_new=1, **kw):
    cache = CacheConfig(window=W, chunk=kw.pop("chunk", 64), capacity=kw.pop("capacity", None))
    return generate_ids(
        params, CFG, prompts, max_new_tokens=max_new, cache=cache, admission=admission, policy=policy,
        return_cache=True, **kw,
    )  # fmt: skip


def kept_positions(state, layer, row, head):
    n = int(state.length[layer, row, head])
    return sorted(np.asarray(state.glob_pos[layer, row, head, :n]).tolist())


def dense_scores(params, tokens, score_fn):
    """Per layer, score_fn(q, q_pos, k [1, K, T, E], v, pos) from a cache-free causal forward."""
    t = len(tokens)
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def attend(state, layer, p, q, k_pre, k, v, pos_bt):
        out = masked_attention(q, k, v, causal_mask(pos_bt, pos_bt))
        kb, vb = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        pos_bkn = jnp.broadcast_to(pos_bt[:, None], kb.shape[:3])
        return out, state.at[layer].set(score_fn(q, pos_bt, kb, vb, pos_bkn)[0])

    state = jnp.zeros((CFG.n_layers, CFG.n_kv_heads, t), jnp.float32)
    _, state = jax.jit(lambda p, x, s: hidden_states(p, CFG, x, pos, attend=attend, state=s))(
        params, jnp.asarray([tokens], jnp.int32), state
    )
    return np.asarray(state)


POLICIES = {
    "snapkv": P.get("snapkv", keep_ratio=0.6, window=8, kernel=3),
    "h2o": P.get("h2o", keep_ratio=0.6),
    "streaming_llm": P.get("streaming_llm", keep_ratio=0.6, sinks=2),
    "chain": P.Chain([P.Protect(sinks=3), P.get("snapkv", keep_ratio=0.6, window=8)]),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_kept_store_is_the_top_k_of_dense_scores(sharp, name):
    n = 50  # one 64-token chunk: the scoring chunk holds every prompt query (H2O's full sum)
    prompt = rand_tokens(n, seed=3)
    policy = POLICIES[name]
    store = E.store_policy(policy, n, W)
    k = int(np.floor(0.6 * n + 1e-9)) - W
    assert store.budget == P.PerHead(P.Tokens(k))
    _, _, stats = run(sharp, [prompt], policy)
    state = stats["cache_state"]
    valid = jnp.ones((1, CFG.n_kv_heads, n), bool)
    oracle = dense_scores(
        sharp, prompt, lambda q, qp, kk, vv, pp: store.score(pos=pp, valid=valid, k=kk, v=vv, q=q, q_pos=qp)
    )
    assert state.capacity < E.store_policy(P.get("snapkv", keep_ratio=1.0), n, W).budget.size.n + 16
    for layer in range(CFG.n_layers):
        for head in range(CFG.n_kv_heads):
            kept = kept_positions(state, layer, 0, head)
            assert len(kept) == k  # exact budget (I2)
            s = oracle[layer, head, : n - W]  # the store's candidates: everything older than the window
            dropped = sorted(set(range(n - W)) - set(kept))
            # the kept set is the top-k (I6); a margin for the two paths' float rounding
            assert s[kept].min() >= s[dropped].max() - 1e-5, (layer, head)
    assert stats["cache"].policy_evicted == CFG.n_layers * CFG.n_kv_heads * (n - W - k)


def test_budget_covering_everything_changes_nothing(sharp):
    prompts = [rand_tokens(n, seed=n) for n in (40, 25)]
    admission = FixedAdmission("random", 0.5, seed=2)
    plain, _, _ = run(sharp, prompts, None, admission, max_new=5)
    for policy in (P.get("h2o", tokens=64), P.get("kvzip", keep_ratio=1.0)):
        got, _, stats = run(sharp, prompts, policy, admission, max_new=5, kvzip_prompt_ids=([5, 6], [7]))
        assert got == plain, policy.name
        assert stats["cache"].policy_evicted == 0


def test_batch_with_padding_equals_rows_alone(sharp):
    prompts = [rand_tokens(50, seed=1), rand_tokens(29, seed=2)]
    policy = P.get("snapkv", tokens=6, window=4)
    toks, _, stats = run(sharp, prompts, policy, max_new=3)
    both = stats["cache_state"]
    for row, prompt in enumerate(prompts):
        alone_toks, _, alone = run(sharp, [prompt], policy, max_new=3)
        assert alone_toks[0] == toks[row]
        for layer in range(CFG.n_layers):
            for head in range(CFG.n_kv_heads):
                assert kept_positions(both, layer, row, head) == kept_positions(alone["cache_state"], layer, 0, head)


def test_room_zero_evicts_during_decode_at_the_budget(sharp):
    """room=0: the store stays at the policy's budget (rounded up to 16 slots) and every token
    decode admits beyond it replaces the lowest gate score; the default room evicts nothing."""
    prompt = rand_tokens(64, seed=4)
    policy = P.get("snapkv", tokens=16, window=4)  # 16 entries per head: capacity exactly 16
    admission = FixedAdmission("random", 0.9, seed=1)  # random gate scores to rank by
    _, _, roomy = run(sharp, [prompt], policy, admission, max_new=40)
    assert roomy["cache"].evicted == 0 and roomy["cache_state"].capacity >= 16 + 40
    _, _, tight = run(sharp, [prompt], policy, admission, max_new=40, room=0)
    state = tight["cache_state"]
    assert state.capacity == 16 and int(np.max(state.length)) == 16
    assert tight["cache"].evicted > 0  # decode admitted more than the budget held
    scores = np.asarray(state.glob_score)
    assert np.all(np.isfinite(scores)) and np.all(np.asarray(state.glob_pos) >= 0)


def test_generate_room_errors():
    model = wgkv_jax.Model(config=CFG, params=init_params(CFG, jax.random.PRNGKey(1)))
    with pytest.raises(ValueError, match="room=0 goes with an eviction policy"):
        wgkv_jax.generate(model, [[1, 2, 3]], gate="all", room=0)
    with pytest.raises(ValueError, match="room=-1 must be >= 0"):
        wgkv_jax.generate(model, [[1, 2, 3]], gate="all", policy="h2o", keep_ratio=0.5, room=-1)


def test_global_and_per_layer_budgets_keep_exact_totals(sharp):
    prompt = rand_tokens(60, seed=9)
    for kind in (P.Global, P.PerLayer):
        policy = P.SnapKV(budget=kind(P.Tokens(10)), window=8)
        _, _, stats = run(sharp, [prompt], policy)
        length = np.asarray(stats["cache_state"].length)
        per = {P.Global: length.sum(), P.PerLayer: length.sum(axis=(1, 2))}[kind]
        assert np.all(per == 10 * CFG.n_kv_heads * (CFG.n_layers if kind is P.Global else 1)), kind
        assert stats["cache_state"].capacity >= length.max()


def test_short_context_is_never_emptied(sharp):
    prompt = rand_tokens(20, seed=4)  # 4 tokens older than the window
    _, _, stats = run(sharp, [prompt], P.get("h2o", tokens=1, recent=0))
    assert (np.asarray(stats["cache_state"].length) == 1).all()


# ----------------------------------------------------------------------------- KVzip


def test_kvzip_pass_is_read_only_and_scores_are_probabilities(sharp):
    prompt = rand_tokens(45, seed=5)
    _, _, stats = run(sharp, [prompt], capacity=64)
    cache = stats["cache_state"]
    before = jax.tree.map(np.asarray, cache)
    policy = P.get("kvzip", keep_ratio=0.5, chunk=16, sinks=2)
    after, score = E.kvzip_pass(sharp, CFG, cache, [prompt], policy, first_ids=[1, 2, 3], next_ids=[4])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # K5
    score, pos, length = np.asarray(score), np.asarray(after.glob_pos), np.asarray(after.length)
    live = np.arange(after.capacity) < length[..., None]
    assert np.isinf(score[live & (pos < 2)]).all()
    rest = score[live & (pos >= 2)]
    assert rest.size and (rest > 0).all() and (rest <= 1).all()  # K1


def test_kvzip_one_chunk_equals_the_dense_formula(sharp):
    n, first = 40, [7, 8, 9]
    prompt = rand_tokens(n, seed=6)
    _, _, stats = run(sharp, [prompt], capacity=64)  # every token older than the window is stored
    policy = P.get("kvzip", keep_ratio=0.5, chunk=64, sinks=0)
    state, score = E.kvzip_pass(sharp, CFG, stats["cache_state"], [prompt], policy, first_ids=first, next_ids=[1])
    seq = prompt + first + prompt  # the context, then the repeat input, in one causal forward
    m = len(seq)

    def fn(q, qp, k, v, pos):
        rep = jnp.where(qp >= n, qp, -1)  # only the repeat queries vote
        return P.kvzip_scores(q, rep, k, pos, jnp.ones(pos.shape, bool), sinks=0)

    oracle = dense_scores(sharp, seq, fn)[..., :n]
    got = np.zeros_like(oracle)
    for layer in range(CFG.n_layers):
        for head in range(CFG.n_kv_heads):
            ln = int(state.length[layer, 0, head])
            got[layer, head, np.asarray(state.glob_pos[layer, 0, head, :ln])] = np.asarray(score)[layer, 0, head, :ln]
    np.testing.assert_allclose(got[..., : n - W], oracle[..., : n - W], atol=2e-5)  # K2
    assert m == 2 * n + len(first)


# ----------------------------------------------------------------------------- errors and the API


def test_policy_errors(sharp):
    prompt = rand_tokens(40)
    with pytest.raises(ValueError, match="no more than the local window"):
        run(sharp, [prompt], P.get("snapkv", keep_ratio=0.2))  # 8 of 40 tokens < W = 16
    with pytest.raises(ValueError, match="Quest is read-time"):
        run(sharp, [prompt], P.get("quest", tokens=32))
    with pytest.raises(ValueError, match="KVzip needs kvzip_prompt_ids"):
        run(sharp, [prompt], P.get("kvzip", keep_ratio=0.5))
    with pytest.raises(ValueError, match="only eviction stage"):
        run(sharp, [prompt], P.Chain([P.Protect(sinks=2), P.KVzip(budget=P.Tokens(4))]), kvzip_prompt_ids=([1], [2]))
    with pytest.raises(ValueError, match="runs on the dual cache"):
        generate_ids(sharp, CFG, [prompt], policy=P.get("h2o", tokens=4))


def test_chain_with_write_gate():
    chain = P.Chain([P.WriteGate("all", tau=0.2), P.Protect(sinks=4), P.get("snapkv", keep_ratio=0.3)])
    assert chain.admission == P.WriteGate("all", tau=0.2) and len(chain.policies) == 1
    with pytest.raises(ValueError, match="only be the first stage"):
        P.Chain([P.get("snapkv", keep_ratio=0.3), P.WriteGate()])
    with pytest.raises(ValueError, match="tau"):
        P.WriteGate(tau=1.5)


@pytest.mark.slow
def test_every_policy_generates_on_smollm2(smollm2, tmp_path, capsys):
    from infer.generate import GenerateArgs, main
    from wgkv_jax.eval import make_needle_case

    case = make_needle_case(smollm2.tokenizer, 500, depth=0.3, seed=2)
    cache = CacheConfig(window=64, chunk=512)  # one prefill chunk: one compile per call
    for name in ("snapkv", "quest"):  # the others: the tiny-model tests above, the CLI and the KVzip test below
        out = wgkv_jax.generate(
            smollm2, [case.prompt], max_new_tokens=4, chat=False, gate="all", cache=cache, policy=name, keep_ratio=0.25
        )
        s = out.cache_stats
        assert out.tokens[0], name
        if name == "quest":  # read-time selection: the cache keeps everything
            assert s.policy_evicted == 0 and s.kv_ratio == pytest.approx(1.0)
        else:  # measured from the cache: 25% of the prompt, plus the new tokens
            assert s.policy_evicted > 0 and 0.2 < s.kv_ratio <= 0.27, (name, s.kv_ratio)
    wg = wgkv_jax.generate(
        smollm2, [case.prompt], max_new_tokens=6, chat=False, cache=cache,
        policy=P.Chain([P.WriteGate(), P.get("snapkv", keep_ratio=0.25)]),
    )  # fmt: skip
    assert wg.tokens[0] and wg.cache_stats.kv_ratio <= 0.27
    with pytest.raises(ValueError, match="needs keep_ratio"):
        wgkv_jax.generate(smollm2, ["hi"], policy="snapkv")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        wgkv_jax.generate(smollm2, ["hi"], policy="lru", keep_ratio=0.5)
    # the CLI
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(case.prompt)
    args = dict(prompt_file=prompt, chat=False, max_new_tokens=4, window=64, ckpt="all", stream=False)
    assert main(GenerateArgs(**args, policy="ahakv", keep_ratio=0.3, budget_kind="per-layer")) == 0
    err = capsys.readouterr().err
    assert "[dual + ahakv 0.3 cache]" in err and "evicted by the policy" in err
    cascading = dict(args, ckpt=None)  # Cascading is its own cache: the default gate is not used
    assert main(GenerateArgs(**cascading, policy="cascading", keep_ratio=0.25)) == 0
    err = capsys.readouterr().err
    assert "[cascading 0.25 cache]" in err and "kv ratio 0.2" in err
    assert main(GenerateArgs(**dict(args, ckpt="none"), policy="cascading", keep_ratio=0.25)) == 2
    assert "cascading is its own cache" in capsys.readouterr().err
    assert main(GenerateArgs(**args, policy="h2o")) == 2
    assert "needs --keep-ratio" in capsys.readouterr().err
    assert main(GenerateArgs(**args, keep_ratio=0.3)) == 2
    assert main(GenerateArgs(**args, policy="nope", keep_ratio=0.3)) == 2
    assert "unknown eviction policy" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Quest (read-time)


def test_quest_reading_every_page_changes_nothing(sharp):
    prompts = [rand_tokens(n, seed=n + 7) for n in (44, 30)]
    admission = FixedAdmission("random", 0.6, seed=1)
    plain, _, _ = run(sharp, prompts, None, admission, max_new=5)
    quest = P.get("quest", tokens=256, page=4, group="max")
    got, _, _ = run(sharp, prompts, None, admission, max_new=5, read_policy=quest)
    assert got == plain
    with pytest.raises(ValueError, match="group='max'"):
        run(sharp, prompts, None, admission, read_policy=P.get("quest", tokens=8))


def test_quest_decode_reads_only_the_top_pages(sharp):
    """One decode step: attention == dense attention over the ring's window + the pages a numpy
    oracle picks by Quest's bound (sum_e max(q_e min_e, q_e max_e), max over the group)."""
    from wgkv_jax.cache import DualAttend, DualCache

    rng = np.random.default_rng(0)
    b, kh, g, e, cap, page, w = 1, 2, 2, 8, 16, 4, 4
    cache = DualCache.zeros(dataclasses.replace(CFG, n_layers=1, head_dim=e), b, w, cap, chunk=1)
    k = rng.standard_normal((1, b, kh, cap, e)).astype(np.float32)
    v = rng.standard_normal((1, b, kh, cap, e)).astype(np.float32)
    pos = np.broadcast_to(np.arange(cap, dtype=np.int32), (1, b, kh, cap))
    length = np.full((1, b, kh), 14, np.int32)  # the last page half full
    cache = dataclasses.replace(cache, glob_k=jnp.asarray(k), glob_v=jnp.asarray(v), glob_pos=jnp.asarray(pos))
    cache = dataclasses.replace(cache, length=jnp.asarray(length))
    q = rng.standard_normal((b, 1, kh, g, e)).astype(np.float32)
    new_k = rng.standard_normal((b, 1, kh, e)).astype(np.float32)
    new_v = rng.standard_normal((b, 1, kh, e)).astype(np.float32)
    p_now = 30  # the ring's window: positions 27..29 never written (zero keys and values), then this token
    quest = P.get("quest", tokens=2 * page, page=page, group="max")
    attend = DualAttend(ALL, read_policy=quest, batched_promotion=True)
    args = (0, {}, jnp.asarray(q), jnp.asarray(new_k), jnp.asarray(new_k), jnp.asarray(new_v), jnp.full((b, 1), p_now))
    out, _ = attend(cache, *args)
    for head in range(kh):
        kk, vv = k[0, 0, head, :14], v[0, 0, head, :14]
        pages = [kk[i : i + page] for i in range(0, 14, page)]
        bound = [
            max(np.sum(np.maximum(q[0, 0, head, j] * pg.min(0), q[0, 0, head, j] * pg.max(0))) for j in range(g))
            for pg in pages
        ]
        top = sorted(np.argsort(-np.asarray(bound), kind="stable")[:2])
        slots = [s for p in top for s in range(p * page, min((p + 1) * page, 14))]
        zeros = np.zeros((w - 1, e), np.float32)
        keys = np.concatenate([kk[slots], zeros, new_k[0, :, head]])
        vals = np.concatenate([vv[slots], zeros, new_v[0, :, head]])
        for j in range(g):
            s = keys @ q[0, 0, head, j] / np.sqrt(e)
            want = np.exp(s - s.max()) @ vals / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(np.asarray(out)[0, 0, head, j], want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- a context reused


def _context(params, ids, policy=None, admission=ALL, capacity=None):
    from wgkv_jax.infer.generate import PrefilledContext

    cache = CacheConfig(window=W, chunk=32, capacity=capacity)
    _, _, stats = generate_ids(
        params, CFG, [ids], max_new_tokens=1, cache=cache, admission=admission, policy=policy, room=48,
        return_cache=True, kvzip_prompt_ids=([3, 4], [5]),
    )  # fmt: skip
    return PrefilledContext(stats["cache_state"], len(ids), cache, admission)


def test_prefilled_context_serves_several_prompts_unchanged(sharp):
    ctx_ids, q1, q2 = rand_tokens(56, seed=21), rand_tokens(9, seed=22), rand_tokens(36, seed=23)
    admission = FixedAdmission("random", 0.5, seed=3)
    # without eviction, continuing the context == generating from context + prompt in one go
    ctx = _context(sharp, ctx_ids, admission=admission, capacity=96)
    saved = [np.asarray(x).copy() for x in jax.tree.leaves(ctx.state)]
    for q in (q1, q2):  # q2 is longer than the ring's spare slots: prefilled in pieces
        got, _, stats = generate_ids(sharp, CFG, [q], max_new_tokens=6, context=ctx)
        cache = CacheConfig(window=W, chunk=32, capacity=96)
        want, _, _ = generate_ids(sharp, CFG, [ctx_ids + q], max_new_tokens=6, cache=cache, admission=admission)
        assert got == want
        assert stats["cache"].full_entries == (len(ctx_ids) + len(q) + 5) * CFG.n_layers * CFG.n_kv_heads
    for a, b in zip(saved, jax.tree.leaves(ctx.state), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # the context is intact after use (K7)
    # compressed by KVzip: a prompt after another == the same prompt on a freshly compressed context
    policy = P.get("kvzip", keep_ratio=0.5, chunk=32)
    ctx = _context(sharp, ctx_ids, policy)
    assert ctx.state.capacity < 96
    generate_ids(sharp, CFG, [q1], max_new_tokens=6, context=ctx)
    after, _, _ = generate_ids(sharp, CFG, [q2], max_new_tokens=6, context=ctx)
    fresh, _, _ = generate_ids(sharp, CFG, [q2], max_new_tokens=6, context=_context(sharp, ctx_ids, policy))
    assert after == fresh
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate_ids(sharp, CFG, [q1, q2], max_new_tokens=2, context=ctx)


@pytest.mark.slow
def test_kvzip_context_compressed_once_answers_questions(smollm2):
    from wgkv_jax.eval import make_task, score

    task = make_task("multiquery", smollm2.tokenizer, 420, seed=4, num_queries=2)
    ctx = wgkv_jax.prefill_context(
        smollm2, task.prefill, gate="all", cache=CacheConfig(window=64), policy="kvzip", keep_ratio=0.5
    )
    assert ctx.stats.policy_evicted > 0 and ctx.stats.kv_ratio < 0.55
    ask = task.question + task.answer_prefix
    out = wgkv_jax.generate(smollm2, [ask, ask], context=ctx, max_new_tokens=24)
    assert out.texts[0] == out.texts[1]  # the context is the same for both questions
    full = wgkv_jax.generate(smollm2, [task.prompt], chat=False, max_new_tokens=24)
    print("kvzip:", out.texts[0], "| full:", full.texts[0], "| answers:", task.answers)
    assert score(task, out.texts[0]) >= score(task, full.texts[0]) - 0.5
    with pytest.raises(ValueError, match="gate, cache and policy are fixed"):
        wgkv_jax.generate(smollm2, [ask], context=ctx, gate="all")
