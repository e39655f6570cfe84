"""Generation with the full cache on a tiny random model: greedy == naive recomputation,
batching, streaming == on-device loop, sampling options, EOS, context errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_LLAMA, TINY_QWEN3

import wgkv_jax
from wgkv_jax.infer.generate import ContextLengthError, generate_ids, prompt_bucket
from wgkv_jax.infer.sampling import SamplingConfig, sample
from wgkv_jax.model import forward, init_params

CFG = TINY_LLAMA


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def naive_greedy(params, cfg, prompt, n):
    """Re-run the whole sequence for every new token: the oracle for the cached loop."""
    seq = list(prompt)
    width = 64  # one compiled shape: causality makes the zero padding after the sequence irrelevant
    for _ in range(n):
        logits = forward(params, cfg, jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def test_greedy_matches_naive_recomputation_batched(params):
    prompts = prompts_of([3, 17, 9])
    got, finished, _ = generate_ids(params, CFG, prompts, max_new_tokens=6)
    for p, g in zip(prompts, got, strict=True):
        assert g == naive_greedy(params, CFG, p, 6)
    assert finished == [False, False, False]


def test_batch_equals_single_rows(params):
    prompts = prompts_of([4, 30])
    batched, _, _ = generate_ids(params, CFG, prompts, max_new_tokens=5)
    single = [generate_ids(params, CFG, [p], max_new_tokens=5)[0][0] for p in prompts]
    assert batched == single


def test_streaming_equals_device_loop(params):
    prompts = prompts_of([6, 12], seed=1)
    seen = []
    streamed, _, _ = generate_ids(
        params,
        CFG,
        prompts,
        max_new_tokens=7,
        sampling=SamplingConfig(0.8, top_k=20),
        seed=3,
        on_token=lambda t: seen.append(t.copy()),
    )
    looped, _, _ = generate_ids(params, CFG, prompts, max_new_tokens=7, sampling=SamplingConfig(0.8, top_k=20), seed=3)
    assert streamed == looped
    assert len(seen) == 7 and [int(s[0]) for s in seen] == streamed[0]


def test_eos_stops_row(params):
    prompt = prompts_of([5], seed=2)[0]
    free = naive_greedy(params, CFG, prompt, 6)
    eos = free[2]
    first = free.index(eos)
    got, finished, _ = generate_ids(params, CFG, [prompt], max_new_tokens=6, eos_ids=(eos,))
    assert got[0] == free[: first + 1] and finished == [True]


def test_seed_determinism_and_variety(params):
    prompts = prompts_of([8], seed=4)
    s = SamplingConfig(temperature=1.5)
    a = generate_ids(params, CFG, prompts, max_new_tokens=8, sampling=s, seed=1)[0]
    b = generate_ids(params, CFG, prompts, max_new_tokens=8, sampling=s, seed=1)[0]
    c = generate_ids(params, CFG, prompts, max_new_tokens=8, sampling=s, seed=2)[0]
    assert a == b and a != c


def test_sampling_filters():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    greedy = sample(logits, keys[0], SamplingConfig())
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample(logits, keys[1], SamplingConfig(1.0, top_k=1)), greedy)
    np.testing.assert_array_equal(sample(logits, keys[2], SamplingConfig(1.0, top_p=1e-6)), greedy)
    top3 = jax.lax.top_k(logits, 3)[1]
    draws = jax.vmap(lambda k: sample(logits, k, SamplingConfig(1.0, top_k=3)))(keys)
    assert all(int(d) in set(np.asarray(top3[r]).tolist()) for r in range(4) for d in draws[:, r])
    # nucleus: the kept set is the smallest prefix of sorted probabilities reaching top_p
    probs = np.asarray(jax.nn.softmax(logits, -1))
    draws = np.asarray(jax.vmap(lambda k: sample(logits, k, SamplingConfig(1.0, top_p=0.5)))(keys))
    for r in range(4):
        order = np.argsort(-probs[r])
        n_keep = int(np.searchsorted(np.cumsum(probs[r][order]), 0.5) + 1)
        assert set(draws[:, r].tolist()) <= set(order[:n_keep].tolist())


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_sampling_config_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_context_limit_errors(params):
    too_long = [[1] * CFG.max_seq_len]
    with pytest.raises(ContextLengthError, match=f"prompt of {CFG.max_seq_len} tokens.*limit of {CFG.max_seq_len}"):
        generate_ids(params, CFG, too_long, max_new_tokens=1)
    with pytest.warns(UserWarning, match="generating at most 2"):
        got, _, _ = generate_ids(params, CFG, [[1] * (CFG.max_seq_len - 2)], max_new_tokens=10)
    assert len(got[0]) == 2
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(params, CFG, [[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_ids(params, CFG, [[1, 2]], max_new_tokens=0)


def test_one_compile_per_bucket(params):
    """Prompt lengths inside one bucket reuse the compiled prefill and decode loop."""
    from wgkv_jax.infer import generate as G

    generate_ids(params, CFG, prompts_of([20]), max_new_tokens=4)
    before = (G.prefill._cache_size(), G.decode_loop._cache_size())
    for n in (17, 25, 31):
        generate_ids(params, CFG, prompts_of([n]), max_new_tokens=4)
    assert (G.prefill._cache_size(), G.decode_loop._cache_size()) == before
    assert prompt_bucket(17) == prompt_bucket(32) == 32 and prompt_bucket(33) == 64


def test_model_api_with_token_ids():
    params = init_params(TINY_QWEN3, jax.random.PRNGKey(5))
    model = wgkv_jax.Model(config=TINY_QWEN3, params=params)
    logits = model.logits(np.zeros((2, 9), np.int32))
    assert logits.shape == (2, 9, TINY_QWEN3.vocab_size) and logits.dtype == jnp.float32
    out = wgkv_jax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=3)
    assert [len(t) for t in out.tokens] == [3, 3] and out.cache_bytes > 0
    with pytest.raises(ValueError, match="must be \\[batch, time\\]"):
        model.logits(np.zeros((9,), np.int32))
    with pytest.raises(ValueError, match="no tokenizer"):
        wgkv_jax.generate(model, "text prompt")
