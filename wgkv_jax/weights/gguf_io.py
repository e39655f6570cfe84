"""GGUF files (llama.cpp): metadata -> ModelConfig, tensors dequantized with the `gguf` package.

GGUF stores shapes fastest-dimension first; `dequantize(...).reshape(reversed(shape))` gives the
HF [out, in] layout. llama.cpp's converter permutes the rows of q/k for the `llama` architecture
(rotate-half pairs -> interleaved pairs); we undo it so one RoPE implementation serves every
source. Qwen2/Qwen3 files are stored unpermuted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params
from wgkv_jax.weights.convert import hf_to_params
from wgkv_jax.weights.safetensors_io import UnsupportedModelError

GGUF_ARCHS = ("llama", "qwen2", "qwen3")

# ggml tensor types we dequantize (all through gguf.quants.dequantize)
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_K",
)

_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if not a model tensor."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _PER_LAYER:
            return f"model.layers.{idx}.{_PER_LAYER[rest]}"
        return f"unmapped:{name}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (interleaved pairs -> rotate-half pairs).

    Rows of one head are stored as (e/2, 2) pairs; HF wants (2, e/2). Works for weights
    [out, in] and biases [out].
    """
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """Read-only view of a GGUF file: metadata fields and named tensors."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader  # imported here: gguf pulls numpy-heavy modules

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.reader = GGUFReader(str(self.path))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def require(self, key: str):
        value = self.field(key)
        if value is None:
            raise UnsupportedModelError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

    def array(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32 in numpy (HF) axis order."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors[name]
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype.name not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name!r} has GGUF type {qtype.name}, which is not supported; "
                f"supported types: {', '.join(SUPPORTED_TYPES)}"
            )
        x = dequantize(t.data, qtype)
        return np.asarray(x, np.float32).reshape([int(d) for d in reversed(t.shape)])


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.require("general.architecture")
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(f"{g.path}: unsupported GGUF architecture {arch!r}; supported: {list(GGUF_ARCHS)}")
    scaling = g.field(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedModelError(f"{g.path}: RoPE scaling type {scaling!r} is not supported")
    d_model = int(g.require(f"{arch}.embedding_length"))
    n_heads = int(g.require(f"{arch}.attention.head_count"))
    head_dim = int(g.field(f"{arch}.attention.key_length", d_model // n_heads))
    vocab = g.tensors["token_embd.weight"].shape[-1] if "token_embd.weight" in g.tensors else None
    if vocab is None:
        raise UnsupportedModelError(f"{g.path}: no token_embd.weight tensor")
    freq_factors = None
    if "rope_freqs.weight" in g.tensors:  # llama3 scaling, precomputed by llama.cpp
        freq_factors = tuple(float(x) for x in g.array("rope_freqs.weight").reshape(-1))
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(g.require(f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g.field(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(g.require(f"{arch}.feed_forward_length")),
        rope_theta=float(g.field(f"{arch}.rope.freq_base", 10000.0)),
        rope_freq_factors=freq_factors,
        rms_eps=float(g.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in g.tensors,
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in g.tensors,
        max_seq_len=int(g.field(f"{arch}.context_length", 8192)),
        name=str(g.field("general.name", g.path.stem)),
    )


def load_gguf(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, Params, GGUFFile]:
    """Config, host (numpy) params and the open file (for the tokenizer) from a GGUF file."""
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    by_hf: dict[str, str] = {}
    for name in g.tensors:
        hf = gguf_to_hf_name(name)
        if hf is not None:
            by_hf[hf] = name

    def get(hf_name: str) -> np.ndarray:
        x = g.array(by_hf[hf_name])
        if cfg.arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            x = unpermute_qk(x, cfg.n_heads if ".q_proj." in hf_name else cfg.n_kv_heads)
        return x

    params = hf_to_params(cfg, get, set(by_hf), source=str(path), dtype=dtype)
    return cfg, params, g
