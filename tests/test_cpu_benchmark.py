"""benchmarks/cpu_generate.py's HF timing helpers on a tiny random HF model (no GGUF, no timing asserts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


# transformers 5 renamed the forward's cache argument and output (`past_key_values` -> `cache`) and
# will drop the old name: the manual loop must use whichever the installed version takes
@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
def test_hf_generate_clocks_the_decode_steps_and_matches_the_manual_loop(benchmark_script):
    bench = benchmark_script("cpu_generate")
    model = _tiny_llama()
    ids = torch.as_tensor(np.random.default_rng(3).integers(0, 128, (2, 11)), dtype=torch.long)
    n_new = 6
    total, decode, new = bench.hf_generate(model, ids, n_new)
    assert new.shape == (2, n_new)
    assert 0.0 < decode < total  # the clock spans the decode steps only (no prefill, no setup)
    _, _, manual, kv = bench.hf_manual(model, ids, n_new)
    np.testing.assert_array_equal(new, manual)  # both greedy over the same model
    assert kv > 0


def test_token_clock_never_stops_generation_and_ticks_once_per_call(benchmark_script):
    bench = benchmark_script("cpu_generate")
    clock = bench.token_clock()
    ids = torch.zeros((3, 4), dtype=torch.long)
    for _ in range(3):
        assert not clock(ids, None).any()
    assert len(clock.times) == 3 and clock.times == sorted(clock.times)
