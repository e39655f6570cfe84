"""The evaluation harness: config errors, Pareto front, reports, and a tiny real run that resumes."""

from __future__ import annotations

import json

import pytest

from wgkv_jax.eval.harness import EvalConfig, markdown_table, pareto, summarize, write_reports


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": ("niah", "sudoku")}, "unknown task"),
        ({"methods": ("full", "lru")}, "unknown method 'lru'"),
        ({"methods": ("wgkv+lru",)}, "unknown method 'wgkv\\+lru'"),
        ({"keep_ratios": (0.0,)}, "keep_ratios"),
        ({"lengths": (64,)}, "lengths"),
        ({"samples": 0}, "samples=0"),
        ({"methods": ("wgkv@1.5",)}, r"'wgkv@1.5': the threshold after '@' must be a number in \[0, 1\)"),
        ({"methods": ("wgkv@low",)}, "'wgkv@low'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(**kwargs)


def test_cells_and_pareto():
    methods = ("full", "wgkv", "snapkv", "wgkv+h2o")
    cfg = EvalConfig(tasks=("niah",), lengths=(512,), methods=methods, keep_ratios=(0.1, 0.5))
    assert cfg.cells() == [
        ("niah", 512, "full", None), ("niah", 512, "wgkv", None), ("niah", 512, "snapkv", 0.1),
        ("niah", 512, "snapkv", 0.5), ("niah", 512, "wgkv+h2o", 0.1), ("niah", 512, "wgkv+h2o", 0.5),
    ]  # fmt: skip
    sweep = EvalConfig(tasks=("niah",), lengths=(512,), methods=("wgkv", "wgkv@0.02"), keep_ratios=(0.1, 0.5))
    assert sweep.cells() == [("niah", 512, "wgkv", None), ("niah", 512, "wgkv@0.02", None)]
    pts = [(0.5, 0.4), (0.2, 0.5), (0.3, 0.3), (0.9, 0.9), (0.95, 0.8), (0.2, 0.1)]
    assert pareto(pts) == [(0.2, 0.5), (0.9, 0.9)]


def test_summary_and_table():
    recs = [
        {"task": t, "length": 512, "method": m, "keep_ratio": r, "accuracy": a, "kv_ratio": kv}
        for t, m, r, a, kv in [
            ("niah", "full", None, 1.0, 1.0), ("vt", "full", None, 0.5, 1.0),
            ("niah", "snapkv", 0.25, 0.5, 0.26), ("vt", "snapkv", 0.25, 0.0, 0.24),
        ]
    ]  # fmt: skip
    summary = summarize(recs)
    snap = next(r for r in summary if r["method"] == "snapkv")
    assert snap["mean_accuracy"] == 0.25 and snap["kv_ratio"] == pytest.approx(0.25)
    table = markdown_table(summary)
    assert "| snapkv @ 0.25 | 0.250 | 50 | 0 | 25.0 |" in table and "| full | 1.000 | 100 | 50 | 75.0 |" in table


@pytest.mark.slow
def test_evaluate_cli_runs_and_resumes(tmp_path, capsys):
    from infer.evaluate import EvaluateArgs, main

    args = EvaluateArgs(
        out=tmp_path, tasks="niah", lengths="384", methods="full,wgkv,snapkv", keep_ratios="0.5", samples=2,
        progress=False,
    )  # fmt: skip
    assert main(args) == 0
    cells = (tmp_path / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 3
    for name in ("results.json", "table.md", "accuracy_vs_kv.png", "admission.png"):
        assert (tmp_path / name).stat().st_size > 0
    res = json.loads((tmp_path / "results.json").read_text())
    by = {c["method"]: c for c in res["cells"]}
    assert by["full"]["kv_ratio"] == 1.0 and by["full"]["accuracy"] == 1.0  # the needle at 384 tokens
    assert 0.4 < by["snapkv"]["kv_ratio"] < 0.6 and by["snapkv"]["policy_evicted"] > 0
    assert by["wgkv"]["kv_ratio"] < 1.0 and len(by["wgkv"]["stored_per_layer_head"]) == 30
    assert all(len(c["predictions"]) == 2 for c in res["cells"])
    capsys.readouterr()
    assert main(args) == 0  # resumes: nothing recomputed
    assert (tmp_path / "cells.jsonl").read_text().splitlines() == cells
    assert "| snapkv @ 0.5 |" in capsys.readouterr().out
    assert main(EvaluateArgs(out=tmp_path, methods="full,nope")) == 2


@pytest.mark.slow
def test_ppl_cells_match_the_dense_forward(smollm2, tmp_path):
    """ppl: "full" through the cache equals the dense forward's perplexity; compressing the context
    costs perplexity but keeps it finite; the KV ratio is measured."""
    import jax
    import numpy as np

    from wgkv_jax.eval.harness import PPL_SCORED, run_matrix
    from wgkv_jax.eval.tasks import make_task

    cfg = EvalConfig(tasks=("ppl",), lengths=(320,), methods=("full", "local", "quest"), keep_ratios=(0.25,), samples=1)
    assert ("ppl", 320, "quest", 0.25) not in cfg.cells()
    cells = {c["method"]: c for c in run_matrix(smollm2, cfg, tmp_path, progress=False)}
    ids = smollm2.encode_prompt(make_task("ppl", smollm2.tokenizer, 320, seed=0).prompt, chat=False)
    logp = np.asarray(jax.nn.log_softmax(smollm2.logits(np.asarray([ids], np.int32))[0], axis=-1))
    tail = np.arange(len(ids) - PPL_SCORED, len(ids))
    dense = float(np.exp(-logp[tail - 1, np.asarray(ids)[tail]].mean()))
    assert cells["full"]["ppl"] == pytest.approx(dense, rel=1e-3) and cells["full"]["kv_ratio"] == 1.0
    assert cells["local"]["kv_ratio"] < 0.5 and np.isfinite(cells["local"]["ppl"])
    assert cells["local"]["ppl"] != pytest.approx(dense, rel=1e-3)
    assert "| method | measured KV ratio | ppl |" in markdown_table(summarize(list(cells.values())))
    paths = write_reports(list(cells.values()), tmp_path)
    assert (tmp_path / "ppl_vs_kv.png").stat().st_size > 0 and "ppl_plot" in paths
