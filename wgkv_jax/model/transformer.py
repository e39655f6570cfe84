"""Decoder-only Llama-family transformer as pure functions over a params pytree.

Axis letters: b batch, t time, d model width, h query heads, k KV heads, g query heads per
KV head (GQA group, h = k * g), e head dim, f FFN width, v vocabulary, l layers.

Params (a nested dict; per-layer arrays are stacked on a leading `l` axis and run with
`lax.scan`):

    embed        [v, d]          final_norm [d]         lm_head [d, v] (absent when tied)
    layers/attn_norm [l, d]      layers/mlp_norm [l, d]
    layers/wq [l, d, h, e]   wk, wv [l, d, k, e]   wo [l, h, e, d]
    layers/bq [l, h, e]      bk, bv [l, k, e]           (qkv_bias, Qwen2)
    layers/q_norm, k_norm [l, e]                        (qk_norm, Qwen3)
    layers/w_gate, w_up [l, d, f]   w_down [l, f, d]

`unstack_layers` turns layers into a list of per-layer dicts (an unrolled loop); with `fuse`
(`fuse_layer`) each dict holds wqkv [d, (h + 2k) e] in place of wq, wk, wv and w_gate_up [d, 2f]
in place of w_gate, w_up: one matmul each, for decode steps that read every weight once.

The attention call site is an `Attend` callable that receives the query, the *pre-RoPE*
key, the post-RoPE key and the value of every layer, so a KV-cache policy (write gates,
dual caches) plugs in without touching this file.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from wgkv_jax.attention.blocked import blocked_causal_attention
from wgkv_jax.model.config import ModelConfig

Params = dict[str, Any]


# ----------------------------------------------------------------------------- logical axes


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (consumed by `wgkv_jax.sharding`)."""
    layers = {
        "attn_norm": ("layers", "embed"),
        "mlp_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "q_heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "q_heads", "head_dim", "embed"),
        "w_gate": ("layers", "embed", "ffn"),
        "w_up": ("layers", "embed", "ffn"),
        "w_down": ("layers", "ffn", "embed"),
    }
    if cfg.qkv_bias:
        layers |= {
            "bq": ("layers", "q_heads", "head_dim"),
            "bk": ("layers", "kv_heads", "head_dim"),
            "bv": ("layers", "kv_heads", "head_dim"),
        }
    if cfg.qk_norm:
        layers |= {"q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim")}
    axes = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "layers": layers}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> Params:
    """Expected shape of every parameter; loaders check real weights against it."""
    L, D, H, K, E, F, V = (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.ffn_dim,
        cfg.vocab_size,
    )
    layers = {
        "attn_norm": (L, D),
        "mlp_norm": (L, D),
        "wq": (L, D, H, E),
        "wk": (L, D, K, E),
        "wv": (L, D, K, E),
        "wo": (L, H, E, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers |= {"bq": (L, H, E), "bk": (L, K, E), "bv": (L, K, E)}
    if cfg.qk_norm:
        layers |= {"q_norm": (L, E), "k_norm": (L, E)}
    shapes = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal, std 0.02; norms at 1) for tests and shape-only benchmarks."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys, strict=True):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype) + 0.1 * jax.random.normal(k, shape, dtype))
        else:
            leaves.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- math


def rms_norm(x, w, eps: float):
    """RMSNorm in float32, cast back to the input dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] in float64 numpy (static), with llama3 scaling."""
    e = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    if cfg.rope_freq_factors is not None:
        factors = np.asarray(cfg.rope_freq_factors, np.float64)
        if factors.shape != inv.shape:
            raise ValueError(f"rope_freq_factors has {factors.size} entries, expected {inv.size} (head_dim / 2)")
        return inv / factors
    s = cfg.rope_scaling
    if s is None:
        return inv
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * np.pi / inv
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    return np.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out)


def apply_rope(x_bt_e, pos_bt, inv_freq):
    """Rotate-half RoPE (HF layout: pairs (i, i + e/2)) at explicit absolute positions.

    x_bt_e: [B, T, ..., E]; pos_bt: int [B, T]. Angles are computed in float32.
    """
    ang_bti = pos_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    ang = ang_bti.reshape(ang_bti.shape[:2] + (1,) * (x_bt_e.ndim - 3) + ang_bti.shape[-1:])
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x_bt_e.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bt_e.dtype)


# ----------------------------------------------------------------------------- attention hook


class Attend(Protocol):
    """What a layer's attention does with its projections (the KV-cache policy lives here).

    Args:
      state: the cache pytree for all layers (or None); layer: traced layer index;
      p: this layer's params (a KV policy keeps its own, e.g. gate weights, beside them);
      q_btkgd: post-RoPE queries; k_pre_btke: keys before RoPE (after k_norm on Qwen3);
      k_btke: post-RoPE keys; v_btke: values; pos_bt: absolute positions.
    Returns:
      (attention output [B, T, K, G, E], new state).
    """

    def __call__(self, state, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt): ...


def causal_self_attend(state, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
    """No cache: causal attention of the sequence over itself."""
    del layer, p, k_pre_btke
    return blocked_causal_attention(q_btkgd, k_btke, v_btke, pos_bt), state


# ----------------------------------------------------------------------------- forward


def _layer(cfg: ModelConfig, inv_freq, attend: Attend, x_btd, p, layer, pos_bt, state):
    b, t, _ = x_btd.shape
    h = rms_norm(x_btd, p["attn_norm"], cfg.rms_eps)
    if "wqkv" in p:  # fused (`fuse_layer`): one matmul, then the q / k / v columns
        hq, hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv = jnp.einsum("btd,df->btf", h, p["wqkv"])
        q_bthe = qkv[..., :hq].reshape(b, t, cfg.n_heads, cfg.head_dim)
        k_btke = qkv[..., hq : hq + hk].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v_btke = qkv[..., hq + hk :].reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    else:
        q_bthe = jnp.einsum("btd,dhe->bthe", h, p["wq"])
        k_btke = jnp.einsum("btd,dke->btke", h, p["wk"])
        v_btke = jnp.einsum("btd,dke->btke", h, p["wv"])
    if cfg.qkv_bias:
        q_bthe, k_btke, v_btke = q_bthe + p["bq"], k_btke + p["bk"], v_btke + p["bv"]
    if cfg.qk_norm:
        q_bthe = rms_norm(q_bthe, p["q_norm"], cfg.rms_eps)
        k_btke = rms_norm(k_btke, p["k_norm"], cfg.rms_eps)
    k_pre_btke = k_btke
    q_bthe = apply_rope(q_bthe, pos_bt, inv_freq)
    k_btke = apply_rope(k_btke, pos_bt, inv_freq)
    q_btkge = q_bthe.reshape(b, t, cfg.n_kv_heads, cfg.group_size, cfg.head_dim)
    with jax.named_scope("attention"):
        o_btkge, state = attend(state, layer, p, q_btkge, k_pre_btke, k_btke, v_btke, pos_bt)
    # heads and head_dim flattened on both sides: contracting (h, e) as two axes let XLA:CPU pick a
    # layout that transposed wo (a weight-sized copy) on every decode step
    o_btf = o_btkge.reshape(b, t, cfg.n_heads * cfg.head_dim).astype(x_btd.dtype)
    x_btd = x_btd + jnp.einsum("btf,fd->btd", o_btf, p["wo"].reshape(cfg.n_heads * cfg.head_dim, -1))
    h = rms_norm(x_btd, p["mlp_norm"], cfg.rms_eps)
    if "w_gate_up" in p:
        gu_btf = jnp.einsum("btd,df->btf", h, p["w_gate_up"])
        g_btf, u_btf = gu_btf[..., : cfg.ffn_dim], gu_btf[..., cfg.ffn_dim :]
    else:
        g_btf = jnp.einsum("btd,df->btf", h, p["w_gate"])
        u_btf = jnp.einsum("btd,df->btf", h, p["w_up"])
    x_btd = x_btd + jnp.einsum("btf,fd->btd", jax.nn.silu(g_btf) * u_btf, p["w_down"])
    return x_btd, state


def hidden_states(
    params: Params, cfg: ModelConfig, tokens_bt, pos_bt, *, attend: Attend = causal_self_attend, state=None
):
    """Final-norm hidden states [B, T, D] and the updated attention state.

    Args:
      tokens_bt: int32 [B, T]; pos_bt: int32 [B, T] absolute positions (RoPE and masks).
      attend: the attention policy (default: causal attention without a cache).
      state: the policy's cache pytree, threaded through the layers.

    params["layers"] is either stacked (one [L, ...] array per weight: a `lax.scan`, one compiled
    layer) or a list of per-layer dicts from `unstack_layers` (an unrolled loop whose matmuls read
    each layer's weights in place; on GPU the scan copies every layer's weight slice first).
    """
    inv_freq = rope_inv_freq(cfg)
    x_btd = jnp.take(params["embed"], tokens_bt, axis=0)
    if isinstance(params["layers"], list | tuple):
        for layer, p in enumerate(params["layers"]):
            x_btd, state = _layer(cfg, inv_freq, attend, x_btd, p, layer, pos_bt, state)
        return rms_norm(x_btd, params["final_norm"], cfg.rms_eps), state

    def body(carry, xs):
        x, st = carry
        p, layer = xs
        return _layer(cfg, inv_freq, attend, x, p, layer, pos_bt, st), None

    layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    (x_btd, state), _ = jax.lax.scan(body, (x_btd, state), (params["layers"], layer_ids))
    return rms_norm(x_btd, params["final_norm"], cfg.rms_eps), state


def unstack_tree(layers: dict, n_layers: int) -> list[dict]:
    """Host-side split of stacked per-layer leaves (numpy views; also works on logical-axis tuples,
    whose leading "layers" name is dropped)."""
    return [{k: (v[1:] if isinstance(v, tuple) else v[i]) for k, v in layers.items()} for i in range(n_layers)]


FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}  # fused weight: its parts, in column order


def fuse_layer(p: dict) -> dict:
    """One layer's weights with wq, wk, wv concatenated into wqkv [d, (h + 2k) e] and w_gate,
    w_up into w_gate_up [d, 2f] (numpy in, numpy out; device arrays are concatenated on device).
    `_layer` runs either form; the fused one makes one matmul where there were three and two."""
    cat = np.concatenate if isinstance(p["wq"], np.ndarray) else jnp.concatenate
    flat = lambda w: w.reshape(w.shape[0], -1)  # noqa: E731  [d, heads, e] -> [d, heads * e]
    out = {k: v for k, v in p.items() if not any(k in parts for parts in FUSED.values())}
    for name, parts in FUSED.items():
        out[name] = cat([flat(p[part]) for part in parts], axis=1)
    return out


def unstack_layers(params: Params, *, free: bool = True, fuse: bool = False) -> Params:
    """The same parameters with params["layers"] as a list of per-layer dicts (separate buffers),
    with `fuse` in the fused form of `fuse_layer` (each fused weight made by one program from the
    stacked parts: no per-layer intermediates left to fragment device memory).

    Converts one weight at a time; with `free`, deletes each stacked array once split (peak: one
    weight's copy), so `params` must not be used afterwards."""
    layers = dict(params["layers"])
    n = len(next(iter(layers.values())))
    out = [{} for _ in range(n)]

    def split(*ws, n=n):  # layer i of each stacked weight, [d, ...] flattened to [d, cols], side by side
        return [jnp.concatenate([w[i].reshape(w.shape[1], -1) for w in ws], axis=1) for i in range(n)]

    for name, parts in FUSED.items() if fuse else ():
        stacked = [layers.pop(part) for part in parts]
        for layer, x in enumerate(jax.jit(split)(*stacked)):
            out[layer][name] = x
        for w in stacked if free else ():
            w.delete()
    for name in list(layers):
        stacked = layers.pop(name)
        for layer, x in enumerate(jax.jit(lambda a, n=n: [a[i] for i in range(n)])(stacked)):
            out[layer][name] = x
        if free and isinstance(stacked, jax.Array):
            stacked.delete()
    return dict(params, layers=out)


def lm_head(params: Params, cfg: ModelConfig, h_btd):
    """Logits in float32 from final-norm hidden states."""
    if cfg.tie_embeddings:  # contract with the [v, d] embedding as stored: no transposed copy
        return jnp.einsum("btd,vd->btv", h_btd, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", h_btd, params["lm_head"], preferred_element_type=jnp.float32)


def forward(params: Params, cfg: ModelConfig, tokens_bt, pos_bt=None):
    """Full-sequence logits float32 [B, T, V] with causal attention (no cache)."""
    if pos_bt is None:
        pos_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
    h_btd, _ = hidden_states(params, cfg, tokens_bt, pos_bt)
    return lm_head(params, cfg, h_btd)
