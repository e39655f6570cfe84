"""Evaluation tasks built from packaged text: RULER-style generators, their scorers, and the
needle-in-a-haystack case used by the benchmarks."""

from wgkv_jax.eval.needle import NeedleCase, make_needle_case
from wgkv_jax.eval.scoring import ruler_percent, score, string_match_all, string_match_part
from wgkv_jax.eval.tasks import (
    TASKS,
    Task,
    common_words,
    make_task,
    niah_multikey,
    niah_multiquery,
    niah_multivalue,
    niah_single,
    ppl_text,
    qa,
    variable_tracking,
)

__all__ = [
    "TASKS",
    "NeedleCase",
    "Task",
    "common_words",
    "make_needle_case",
    "make_task",
    "niah_multikey",
    "niah_multiquery",
    "niah_multivalue",
    "niah_single",
    "ppl_text",
    "qa",
    "ruler_percent",
    "score",
    "string_match_all",
    "string_match_part",
    "variable_tracking",
]
