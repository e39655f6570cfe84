"""`python -m train.distill` end to end on the real model (slow): train, resume, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.models import SMOLLM2_135M
from wgkv_jax.train.checkpoint import load_gate_safetensors

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    "tiny_cpu",
    "--seq-len",
    "256",
    "--window",
    "32",
    "--attn-block",
    "128",
    "--val-batches",
    "1",
    "--save-every",
    "1",
    "--val-every",
    "10",
]


def distill(out: Path, *args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"WGKV_DATA_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "train.distill", *TINY, "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_distill_trains_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    done = distill(out, "--steps", "2", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    done = distill(out, "--steps", "3", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed" in done.stdout and "at step 2" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # the resumed run appends, never repeats a step
    assert all(0.0 <= r["admit"] <= 1.0 and r["loss"] > 0 for r in rows)
    _, meta = load_gate_safetensors(out / "gate.safetensors", SMOLLM2_135M)
    assert meta["step"] == 3 and meta["config"]["window"] == 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and "val_distill" in summary


def test_distill_rejects_unknown_preset(tmp_path):
    done = distill(tmp_path / "x", "--config", "nope", cache=tmp_path)
    assert done.returncode != 0 and "unknown --config 'nope'" in done.stderr


def test_distill_rejects_unknown_attention_impl(tmp_path):
    done = distill(tmp_path / "x", "--config", "tiny_cpu", "--attention-impl", "magic", cache=tmp_path)
    assert done.returncode != 0 and "attention_impl='magic'" in done.stderr
