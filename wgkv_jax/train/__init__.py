"""Library side of gate training: the soft-gated student and the WG-KV objective."""

from wgkv_jax.train.objective import (
    SoftGateAttend,
    distill_loss,
    sparsity_loss,
    sparsity_weights,
    student_hidden,
    wgkv_loss,
)

__all__ = ["SoftGateAttend", "distill_loss", "sparsity_loss", "sparsity_weights", "student_hidden", "wgkv_loss"]
