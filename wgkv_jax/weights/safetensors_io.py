"""HF checkpoint directories: `config.json` + `*.safetensors` (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from wgkv_jax.model.config import ModelConfig, RopeScaling
from wgkv_jax.model.transformer import Params
from wgkv_jax.weights.convert import hf_to_params

# HF `architectures[0]` / `model_type` -> our arch
HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture or feature this library does not implement."""


def config_from_hf(cfg: dict, *, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed HF `config.json`."""
    archs = cfg.get("architectures") or []
    arch = HF_ARCHS.get(archs[0]) if archs else HF_MODEL_TYPES.get(cfg.get("model_type", ""))
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; supported: {sorted(HF_ARCHS)}"
        )
    if cfg.get("use_sliding_window") or (arch == "llama" and cfg.get("sliding_window")):
        raise UnsupportedModelError(f"{source}: sliding-window attention layers are not supported")
    if cfg.get("attention_bias") and arch in ("llama", "qwen3"):
        raise UnsupportedModelError(f"{source}: attention_bias=True (with an o_proj bias) is not supported")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=True is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act={cfg.get('hidden_act')!r}; only 'silu' is supported")
    # transformers >= 5 nests RoPE settings in `rope_parameters`; older files use rope_theta/rope_scaling
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position=int(scaling["original_max_position_embeddings"]),
            )
        elif kind not in (None, "default"):
            raise UnsupportedModelError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")
    n_heads = int(cfg["num_attention_heads"])
    d_model = int(cfg["hidden_size"])
    return ModelConfig(
        arch=arch,
        vocab_size=int(cfg["vocab_size"]),
        d_model=d_model,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or d_model // n_heads),
        ffn_dim=int(cfg["intermediate_size"]),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
        name=str(cfg.get("_name_or_path") or archs[0] if archs else arch),
    )


def _tensor_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from `model.safetensors.index.json` or the single/multiple files."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / fname for name, fname in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.exists()})
        if absent:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {absent[:3]}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    files = {}
    for f in shards:
        with safe_open(f, framework="numpy") as st:
            files |= {name: f for name in st.keys()}
    return files


def load_hf_dir(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, Params]:
    """Config and host (numpy) params from an HF model directory."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: not an HF model directory (no config.json)")
    cfg = config_from_hf(json.loads(cfg_path.read_text()), source=str(cfg_path))
    files = _tensor_files(path)
    handles: dict[Path, object] = {}

    def get(name: str) -> np.ndarray:
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="numpy")
        x = handles[f].get_tensor(name)
        return x.astype(np.float32) if x.dtype.kind == "V" or str(x.dtype) == "bfloat16" else x

    params = hf_to_params(cfg, get, set(files), source=str(path), dtype=dtype)
    return cfg, params
