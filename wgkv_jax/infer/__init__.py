"""Inference: sampling and generation loops over a static-shape KV cache."""
