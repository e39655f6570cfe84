"""Shared fixtures: tiny random configs and the real SmolLM2-135M model (loaded once)."""

from __future__ import annotations

import dataclasses
import os

# 8 fake CPU devices for the sharding tests; must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

from wgkv_jax.model.config import ModelConfig

jax.config.update("jax_default_matmul_precision", "highest")

TINY_LLAMA = ModelConfig(
    arch="llama",
    vocab_size=128,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=96,
    rope_theta=10000.0,
    max_seq_len=512,
    tie_embeddings=False,
)
TINY_QWEN2 = dataclasses.replace(TINY_LLAMA, arch="qwen2", rope_theta=1e6, qkv_bias=True, tie_embeddings=True)
TINY_QWEN3 = dataclasses.replace(TINY_LLAMA, arch="qwen3", rope_theta=1e6, qk_norm=True, tie_embeddings=True)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1), float32."""
    import wgkv_jax

    return wgkv_jax.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def benchmark_script():
    """Load a script of benchmarks/ (a folder of scripts, not a package) as a module, by name."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
