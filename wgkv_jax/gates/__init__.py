"""Admission gates: a registry of write-gate architectures behind one interface.

    gate = gates.make("wgkv", model_cfg)                    # a Flax Linen module (one layer)
    params = gates.init_stacked(gate, model_cfg, key)       # [L, ...] leaves, beside the layers
    g_bkt = gate.apply({"params": layer_params}, k_pre, k_post, v)

An ablation is one class in `modules.py` plus one line in `GATES`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wgkv_jax.gates.modules import LinearWriteGate, PostRopeWriteGate, ValueWriteGate, WriteGate
from wgkv_jax.model.config import ModelConfig

GATES: dict[str, type[WriteGate]] = {
    "wgkv": WriteGate,
    "wgkv_v": ValueWriteGate,
    "post_rope": PostRopeWriteGate,
    "linear": LinearWriteGate,
}


def make(name: str, cfg: ModelConfig, **overrides) -> WriteGate:
    """The gate module `name` sized for `cfg` (fields such as expand/act can be overridden)."""
    if name not in GATES:
        raise KeyError(f"unknown gate {name!r}; registered gates: {sorted(GATES)}")
    return GATES[name](num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, **overrides)


def init_stacked(gate: WriteGate, cfg: ModelConfig, key: jax.Array):
    """Independent gate params for every layer, stacked on a leading [L] axis (float32)."""
    x = jnp.zeros((1, 1, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    keys = jax.random.split(key, cfg.n_layers)
    return jax.vmap(lambda k: gate.init(k, x, x, x)["params"])(keys)


# trained gates shipped with the package: model name -> file under wgkv_jax/assets/gates
SHIPPED: dict[str, str] = {
    "smollm2-135m": "smollm2-135m-lambda0.16.safetensors",
    # lambda 0.32, 2000 steps of the qwen25_coder_05b preset on an H100; admits ~47% of the tokens leaving the window
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-lambda0.32.safetensors",
}


def load(name_or_path: str, cfg: ModelConfig):
    """A trained gate: (module, stacked params, meta) from a shipped name, a gate.safetensors file,
    or a training output directory (which holds gate.safetensors).

    The file's training config names the architecture; shapes are checked against `cfg`.
    """
    from pathlib import Path

    from wgkv_jax.train.checkpoint import load_gate_safetensors

    path = (
        Path(__file__).resolve().parents[1] / "assets" / "gates" / SHIPPED[name_or_path]
        if name_or_path in SHIPPED
        else Path(name_or_path).expanduser()
    )
    if path.is_dir():
        if not (path / "gate.safetensors").is_file():
            raise FileNotFoundError(
                f"{path} is a directory without gate.safetensors; pass a gate file, a training output directory "
                f"(train.distill writes gate.safetensors there), or one of the shipped gates {sorted(SHIPPED)}"
            )
        path = path / "gate.safetensors"
    params, meta = load_gate_safetensors(path, cfg)
    train_cfg = meta.get("config", {})
    gate = make(train_cfg.get("gate", "wgkv"), cfg, expand=train_cfg.get("expand", 4.0))
    return gate, params, meta


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


__all__ = [
    "GATES",
    "SHIPPED",
    "LinearWriteGate",
    "PostRopeWriteGate",
    "ValueWriteGate",
    "WriteGate",
    "init_stacked",
    "load",
    "make",
    "param_count",
]
