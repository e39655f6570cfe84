"""Evaluation tasks (needle-in-a-haystack) built from packaged text."""

from wgkv_jax.eval.needle import NeedleCase, make_needle_case

__all__ = ["NeedleCase", "make_needle_case"]
