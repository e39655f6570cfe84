"""The user notebooks (notebooks/*.ipynb) run top to bottom with tiny settings, so they cannot rot.

Each notebook runs in a fresh kernel of this interpreter (nbclient), in a temporary working directory, with
WGKV_NOTEBOOK_TINY=1 (seconds-long settings); any cell error fails the test with the cell's traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300  # a cell that compiles and runs the real model takes ~10 s on 2 CPU cores


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Run notebooks/<name> in tmp_path; the executed notebook (with outputs)."""
    monkeypatch.setenv("WGKV_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp lands in tmp_path
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # conftest's 8 fake devices would split the training batch
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed (stdout streams and text/plain results)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif "data" in out and "text/plain" in out.data:
                parts.append(out.data["text/plain"])
    return "\n".join(parts)


def images_of(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "train_gate.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch)
    text = text_of(nb)
    # the full cache, the gate and the gate + SnapKV each print a cache summary; the dual ones with W and C
    assert text.count("KV entries") == 3 and text.count("W=64 C=") == 2, text
    assert "evicted by the policy" in text  # SnapKV compacted the store
    table = {line.split()[0]: line for line in text.splitlines() if line.startswith(("full cache ", "WG-KV "))}
    assert "correct" in table["full"] and "100.0%" in table["full"], table  # the baseline finds the needle
    assert "(layer, KV head) stores hold the whole number" in text and "mean admission" in text
    assert images_of(nb) == 1  # the admission heatmap


@pytest.mark.slow
def test_train_gate_runs(tmp_path, monkeypatch):
    nb = execute("train_gate.ipynb", tmp_path, monkeypatch)
    written = sorted(tmp_path.iterdir())
    assert len(written) == 1 and written[0].name.startswith("wgkv-gate-"), written  # only the notebook's OUT
    out = written[0]
    assert (out / "gate.safetensors").is_file() and (out / "checkpoints").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)
    text = text_of(nb)
    assert "4 logged steps, 2 validations" in text and "trained gate: W=32, step 4" in text
    assert text.count("KV entries") == 2 and "mean admission" in text  # generated with both gates
    assert images_of(nb) == 2  # loss curves and admission per layer
