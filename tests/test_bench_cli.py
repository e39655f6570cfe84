"""The long-context benchmark CLI: argument errors, and the plot of a measured result file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from infer import bench as cli
from wgkv_jax.infer import bench as bench_lib

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


def test_merge_joins_separate_runs_and_refuses_mismatched_settings(tmp_path, capsys):
    """Runs of other parts (or contexts) merge back into the rows of one run; a run of other
    settings is refused by name; a missing file is an error, not an empty result."""
    data = json.loads(RESULT.read_text())
    parts = [{"attention_prefill", "attention_decode"}, {"end_to_end"}]
    files = []
    for i, keep in enumerate(parts):
        run = dict(
            data, contexts={c: {k: v for k, v in row.items() if k in keep} for c, row in data["contexts"].items()}
        )
        files.append(tmp_path / f"part{i}.json")
        files[-1].write_text(json.dumps(run))
    out = tmp_path / "merged.json"
    assert cli.main(["--merge", *map(str, files), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    for c, row in data["contexts"].items():
        for part in set().union(*parts) & set(row):
            assert merged["contexts"][c][part] == row[part]
    assert set(merged["runs"]) == {"part0.json", "part1.json"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    other = dict(data, settings=dict(data["settings"], window=128))
    with pytest.raises(ValueError, match=r"b has window=128, a has 256"):
        bench_lib.merge_results([data, other], ["a", "b"])
    assert cli.main(["--merge", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_batch_part_needs_a_memory_budget_when_none_is_reported():
    """The platform allocator reports no memory limit: the batch search must be given one."""
    from configs.models import TINY_BENCH
    from wgkv_jax.cache.dual import CacheConfig
    from wgkv_jax.infer import bench

    with pytest.raises(ValueError, match=r"no free device memory reported \(0 bytes.*--batch-memory"):
        bench.batch_decode(None, TINY_BENCH, 1024, CacheConfig(window=256, chunk=256), 0.2, 4, hbm_free=0)


def test_device_trace_summary_counts_stream_kernels_only():
    """Busy time is the union of the device streams' kernel intervals (overlaps counted once);
    host threads and derived lines such as "XLA Ops" are not kernels."""
    from wgkv_jax.infer.bench import device_events, kernel_summary, kernel_time

    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": 2, "tid": 20, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 21, "name": "thread_name", "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 22, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]
    x = lambda pid, tid, ts, dur, name: {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}  # noqa: E731
    events = [
        x(1, 10, 0, 100, "host work"),
        x(2, 22, 0, 100, "fusion.1"),  # a derived line: the same work again
        x(2, 20, 0, 10, "fusion.1"),
        x(2, 21, 5, 10, "fusion.2"),  # overlaps the first: busy 0-15
        x(2, 20, 25, 5, "wgkv_ragged_attention"),  # gap 15-25
        x(2, 20, 40, 20, "fusion.3"),  # gap 30-40
    ]
    kernels, threads = device_events({"traceEvents": meta + events})
    assert [name for _, _, name in kernels] == ["fusion.1", "fusion.2", "wgkv_ragged_attention", "fusion.3"]
    assert threads["/host:CPU | python"] == 1 and threads["/device:GPU:0 | XLA Ops"] == 1
    s = kernel_summary(kernels, steps=2)
    assert s["span_ms_per_step"] == pytest.approx(60 / 2 / 1e3)
    assert s["busy_ms_per_step"] == pytest.approx(40 / 2 / 1e3)
    assert s["gap_ms_per_step"] == pytest.approx(20 / 2 / 1e3)
    assert s["kernels_per_step"] == 2
    assert s["top_kernels"][0] == {"kernel": "fusion.#", "ms_per_step": 40 / 2 / 1e3, "per_step": 1.5}
    k = kernel_time(kernels, 2, "wgkv_ragged_attention")  # the attention kernel alone vs all of the call
    assert k == pytest.approx(
        {"busy_ms": 40 / 2 / 1e3, "span_ms": 60 / 2 / 1e3, "kernel_ms": 5 / 2 / 1e3, "kernels": 2}
    )


@pytest.mark.parametrize("argv, swept", [([], [True, False]), (["--no-sweep"], [False, False])])
def test_tile_sweep_runs_at_the_first_context_unless_turned_off(argv, swept, monkeypatch, tmp_path):
    """The GPU tile sweeps run with the first context's attention part only, and not with --no-sweep."""
    seen = []

    def part(cfg, n, setting, rate, repeats, tilings=(), **kw):
        seen.append((n, bool(tilings)))
        return {"n": n}

    monkeypatch.setattr(bench_lib, "_ragged", lambda: "pallas")  # as on a GPU
    monkeypatch.setattr(bench_lib, "attention_prefill", part)
    monkeypatch.setattr(bench_lib, "attention_decode", part)
    monkeypatch.setattr(bench_lib, "plot", lambda result, path: None)  # these rows hold no timings to draw
    out = tmp_path / "r.json"
    argv = ["--config", "tiny", "--contexts", "8192", "4096", "--parts", "attention", "--out", str(out), *argv]
    assert cli.main(argv) == 0
    assert seen == [(8192, swept[0]), (8192, swept[0]), (4096, swept[1]), (4096, swept[1])]
    assert json.loads(out.read_text())["contexts"]["4096"]["attention_prefill"] == {"n": 4096}


def test_merge_compares_the_weight_layout_only_where_a_part_depends_on_it():
    """Attention-only runs merge with a run of any layout; two end-to-end runs of different
    layouts are refused; a run from before `layers` (prefill on the scanned stack, decode on
    decode_layers) merges its batch part (decode only) with a run of that decode layout."""
    data = json.loads(RESULT.read_text())

    def keep(parts, **settings):
        rows = {c: {k: v for k, v in row.items() if k in parts} for c, row in data["contexts"].items()}
        plain = {k: v for k, v in data["settings"].items() if k not in ("layers", "decode_layers")}
        return dict(data, settings=plain | settings, contexts=rows)

    attention = keep({"attention_prefill", "attention_decode"}, layers="scanned")
    e2e_fused, e2e_scanned = keep({"end_to_end"}, layers="fused"), keep({"end_to_end"}, layers="scanned")
    merged = bench_lib.merge_results([attention, e2e_fused], ["att", "e2e"])
    assert {"attention_prefill", "end_to_end"} <= set(merged["contexts"]["131072"])
    with pytest.raises(ValueError, match=r"b's end_to_end ran on layers='scanned', a's on 'fused'"):
        bench_lib.merge_results([e2e_fused, e2e_scanned], ["a", "b"])
    old_batch = dict(keep({"batch"}, decode_layers="fused"))
    old_batch["contexts"] = {"131072": {"batch": {"rows": 1}}}
    assert bench_lib.merge_results([e2e_fused, old_batch], ["new", "old"])["contexts"]["131072"]["batch"]
    old_e2e = keep({"end_to_end"}, decode_layers="fused")
    with pytest.raises(ValueError, match=r"old's end_to_end ran on layers='scanned prefill, fused decode'"):
        bench_lib.merge_results([e2e_fused, old_e2e], ["new", "old"])


def test_model_params_names_an_unknown_layout():
    from configs.models import TINY_BENCH

    with pytest.raises(ValueError, match=r"layers='stacked': expected one of \('fused', 'unrolled', 'scanned'\)"):
        bench_lib.model_params(TINY_BENCH, "stacked")
    fused = bench_lib.model_params(TINY_BENCH, "fused")
    assert isinstance(fused["layers"], list) and "wqkv" in fused["layers"][0]


def test_end_to_end_part_runs_on_one_weight_layout_for_prefill_and_decode(monkeypatch):
    """The end-to-end part (tiny model, CPU) on the fused layout: both prefills and decodes run on
    that one set of weights, the dual cache stores about the admitted fraction, and the ratios
    are those of the times it reports."""
    from configs.models import TINY_BENCH

    seen = []
    real = bench_lib.end_to_end
    monkeypatch.setattr(bench_lib, "end_to_end", lambda params, *a, **k: seen.append(params) or real(params, *a, **k))
    with pytest.warns(UserWarning, match="cuDNN attention needs a GPU"):  # the full prefill's baseline, off GPU
        res = bench_lib.run(
            [1024], ["e2e"], cfg=TINY_BENCH, chunk=256, steps=2, layers="fused", rate=0.25, capacity_fraction=0.5
        )
    assert res["settings"]["layers"] == "fused"
    assert isinstance(seen[0]["layers"], list) and "wqkv" in seen[0]["layers"][0]
    e2e = res["contexts"]["1024"]["end_to_end"]
    assert e2e["prefill_speedup"] == pytest.approx(e2e["full_prefill_s"] / e2e["dual_prefill_s"])
    assert e2e["decode_speedup"] == pytest.approx(e2e["full_decode_ms"] / e2e["dual_decode_ms"])
    assert 0.12 < e2e["dual_stored_fraction"] < 0.28  # 25% of the 768 tokens beyond W = 256, over 1024
    assert e2e["dual_kv_bytes"] < e2e["full_kv_bytes"] and e2e["dual_evicted"] == 0
