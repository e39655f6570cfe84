"""Model shapes by name, for shape-only work (random-weight benchmarks, memory planning).

Real weights always come with their own config (HF `config.json` or GGUF metadata); the
SmolLM2 preset is checked against the GGUF's metadata by the tests.
"""

from __future__ import annotations

from wgkv_jax.model.config import ModelConfig, RopeScaling

SMOLLM2_135M = ModelConfig(
    arch="llama",
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    ffn_dim=1536,
    rope_theta=100000.0,
    rms_eps=1e-5,
    tie_embeddings=True,
    max_seq_len=8192,
    name="SmolLM2-135M",
)
LLAMA31_8B = ModelConfig(
    arch="llama",
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=14336,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
    rms_eps=1e-5,
    tie_embeddings=False,
    max_seq_len=131072,
    name="Llama-3.1-8B",
)
QWEN25_05B = ModelConfig(
    arch="qwen2",
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    head_dim=64,
    ffn_dim=4864,
    rope_theta=1000000.0,
    rms_eps=1e-6,
    tie_embeddings=True,
    qkv_bias=True,
    max_seq_len=32768,
    name="Qwen2.5-0.5B",
)
QWEN3_4B = ModelConfig(
    arch="qwen3",
    vocab_size=151936,
    d_model=2560,
    n_layers=36,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    ffn_dim=9728,
    rope_theta=5000000.0,
    rms_eps=1e-6,
    tie_embeddings=True,
    qk_norm=True,
    max_seq_len=262144,
    name="Qwen3-4B-2507",
)

PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": SMOLLM2_135M,
    "llama3.1-8b": LLAMA31_8B,
    "qwen2.5-0.5b": QWEN25_05B,
    "qwen3-4b": QWEN3_4B,
}
# A two-layer stack with Llama-3.1-8B's attention layout scaled down (GQA 4, head_dim 64): CPU
# smoke runs of the long-context benchmark.
TINY_BENCH = ModelConfig(
    arch="llama",
    vocab_size=256,
    d_model=128,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    head_dim=64,
    ffn_dim=256,
    rope_theta=500000.0,
    rms_eps=1e-5,
    tie_embeddings=False,
    max_seq_len=131072,
    name="tiny-bench",
)
