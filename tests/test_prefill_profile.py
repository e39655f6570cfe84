"""benchmarks/prefill_profile.py on the tiny model (CPU): the profiled chunks are real next chunks
of the prompt (the dual cache keeps admitting at the configured rate), and bad lengths are named."""

from __future__ import annotations

import json

import pytest


def test_smoke_run_profiles_dual_and_attention_free_chunks(tmp_path, benchmark_script):
    out = tmp_path / "p.json"
    assert benchmark_script("prefill_profile").main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    dual, skip = res["chunks"]["dual"], res["chunks"]["no_attention"]
    assert res["settings"]["start"] == 4096 - 3 * 512
    # the dual chunks went on admitting ~20% of the new tokens; with attention skipped the
    # cache is left as the synthetic prefix made it (fewer stored per token of the context)
    assert 0.15 < dual["stored_fraction"] < 0.25
    assert skip["stored_fraction"] < dual["stored_fraction"]
    assert dual["wall_ms"] > 0 and len(dual["wall_ms_all"]) == 1
    assert res["dual_extra_wall_ms"] == pytest.approx(dual["wall_ms"] - skip["wall_ms"])


def test_too_short_a_context_is_named(capsys, benchmark_script):
    with pytest.raises(SystemExit):
        benchmark_script("prefill_profile").main(["--context", "8192", "--chunk", "2048", "--repeats", "3"])
    assert "--context 8192: needs at least 6 chunks of 2048" in capsys.readouterr().err
