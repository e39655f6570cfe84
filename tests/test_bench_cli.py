"""The long-context benchmark CLI: argument errors, and the plot of a measured result file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from infer import bench as cli

RESULT = Path(__file__).resolve().parents[1] / "results" / "long_context_h100.json"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--contexts", "3000"], "multiple of --chunk 2048"),
        (["--contexts", "2048"], "at least two chunks"),
        (["--rate", "0"], r"--rate 0.0 must be in \(0, 1\]"),
        (["--parts", "speed"], "invalid choice"),
    ],
)
def test_bad_arguments_are_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert __import__("re").search(match, capsys.readouterr().err)


def test_plot_only_redraws_png(tmp_path):
    data = json.loads(RESULT.read_text())
    assert {"attention_prefill", "attention_decode", "end_to_end"} <= set(data["contexts"]["131072"])
    copy = tmp_path / "r.json"
    shutil.copy(RESULT, copy)
    assert cli.main(["--plot-only", str(copy)]) == 0
    png = copy.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_batch_part_needs_a_memory_budget_when_none_is_reported():
    """The platform allocator reports no memory limit: the batch search must be given one."""
    from configs.models import TINY_BENCH
    from wgkv_jax.cache.dual import CacheConfig
    from wgkv_jax.infer import bench

    with pytest.raises(ValueError, match=r"no free device memory reported \(0 bytes.*--batch-memory"):
        bench.batch_decode(None, TINY_BENCH, 1024, CacheConfig(window=256, chunk=256), 0.2, 4, hbm_free=0)
