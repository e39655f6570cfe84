"""HF-layout tensors -> the stacked params pytree of `wgkv_jax.model`.

Both loaders (safetensors and GGUF) first produce a flat dict of numpy arrays under HF names
in HF layout (`nn.Linear.weight` is [out, in]); this module checks every shape against the
config, reshapes projections into einsum form and stacks the layers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import Params


class WeightsMismatchError(ValueError):
    """The config and the weights disagree (a shape, a missing or an unexpected tensor)."""


# our per-layer name -> (HF name suffix, converter from the HF array)
def _layer_table(cfg: ModelConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], tuple[int, ...]]]:
    D, H, K, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    table = {
        "attn_norm": ("input_layernorm.weight", lambda w: w, (D,)),
        "mlp_norm": ("post_attention_layernorm.weight", lambda w: w, (D,)),
        "wq": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, E), (H * E, D)),
        "wk": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, E), (K * E, D)),
        "wv": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, E), (K * E, D)),
        "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, E, D), (D, H * E)),
        "w_gate": ("mlp.gate_proj.weight", lambda w: w.T, (F, D)),
        "w_up": ("mlp.up_proj.weight", lambda w: w.T, (F, D)),
        "w_down": ("mlp.down_proj.weight", lambda w: w.T, (D, F)),
    }
    if cfg.qkv_bias:
        table |= {
            "bq": ("self_attn.q_proj.bias", lambda b: b.reshape(H, E), (H * E,)),
            "bk": ("self_attn.k_proj.bias", lambda b: b.reshape(K, E), (K * E,)),
            "bv": ("self_attn.v_proj.bias", lambda b: b.reshape(K, E), (K * E,)),
        }
    if cfg.qk_norm:
        table |= {
            "q_norm": ("self_attn.q_norm.weight", lambda w: w, (E,)),
            "k_norm": ("self_attn.k_norm.weight", lambda w: w, (E,)),
        }
    return table


# HF tensors that carry no parameters of ours and may be skipped silently
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies, with its HF-layout shape."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.d_model), "model.norm.weight": (cfg.d_model,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    for i in range(cfg.n_layers):
        for hf_suffix, _, shape in _layer_table(cfg).values():
            shapes[f"model.layers.{i}.{hf_suffix}"] = shape
    return shapes


def hf_to_params(
    cfg: ModelConfig, get: Callable[[str], np.ndarray], names: set[str], *, source: str, dtype=np.float32
) -> Params:
    """Build params from HF-named tensors.

    Args:
      cfg: the model config the tensors must match.
      get: returns the HF-layout numpy array of a tensor name (read lazily, one at a time).
      names: all tensor names available in the source.
      source: path shown in error messages.
      dtype: numpy dtype of the result (host memory).

    Raises:
      WeightsMismatchError naming the tensor and both shapes, or the missing/unexpected names.
    """
    expected = expected_hf_shapes(cfg)
    missing = sorted(set(expected) - names)
    if missing:
        raise WeightsMismatchError(
            f"{source}: {len(missing)} tensor(s) the config needs are missing, e.g. {missing[:4]}"
        )
    unexpected = sorted(
        n
        for n in names - set(expected)
        if not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight")
    )
    if unexpected:
        raise WeightsMismatchError(
            f"{source}: {len(unexpected)} tensor(s) not used by a {cfg.arch} model with this config, "
            f"e.g. {unexpected[:4]}"
        )

    def load(name: str) -> np.ndarray:
        w = np.asarray(get(name))
        if tuple(w.shape) != expected[name]:
            raise WeightsMismatchError(
                f"{source}: tensor {name!r} has shape {tuple(w.shape)} but the config expects {expected[name]}"
            )
        return w.astype(dtype, copy=False)

    layers = {}
    for ours, (hf_suffix, conv, _) in _layer_table(cfg).items():
        layers[ours] = np.stack([conv(load(f"model.layers.{i}.{hf_suffix}")) for i in range(cfg.n_layers)])
    params: Params = {
        "embed": load("model.embed_tokens.weight"),
        "final_norm": load("model.norm.weight"),
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(load("lm_head.weight").T)
    return params
