"""Named models shipped in several pip packages: assembled once into the model cache, checked by
sha256, with clear errors for a missing package or corrupt parts."""

from __future__ import annotations

import hashlib
import sys

import pytest

from wgkv_jax import api


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Two real (tiny) packages on sys.path holding the halves of a file, and a registry entry."""
    blob = bytes(range(256)) * 300
    for i, piece in enumerate((blob[:40_000], blob[40_000:]), start=1):
        pkg = tmp_path / "site" / f"wgkvtest_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(piece)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("WGKV_CACHE", str(tmp_path / "cache"))
    split = api.SplitModel(
        filename="toy.gguf",
        parts=tuple((f"wgkvtest_part{i}", f"data/part{i:02d}.bin") for i in (1, 2)),
        sha256=hashlib.sha256(blob).hexdigest(),
        pip="wgkvtest-part1 wgkvtest-part2",
    )
    monkeypatch.setitem(api.SPLIT_MODELS, "toy", split)
    yield blob, split
    for i in (1, 2):
        sys.modules.pop(f"wgkvtest_part{i}", None)


def test_parts_are_assembled_once_and_checked(parts, tmp_path):
    blob, _ = parts
    path = api.resolve_model_path("toy")
    assert path == tmp_path / "cache" / "toy.gguf" and path.read_bytes() == blob
    path.write_bytes(b"kept")  # an existing file is reused, not rebuilt
    assert api.resolve_model_path("toy").read_bytes() == b"kept"


def test_corrupt_parts_raise_and_leave_nothing_behind(parts, tmp_path, monkeypatch):
    _, split = parts
    monkeypatch.setitem(api.SPLIT_MODELS, "toy", api.SplitModel(split.filename, split.parts, "0" * 64, split.pip))
    with pytest.raises(ValueError, match=r"expected 0000.*force-reinstall wgkvtest-part1"):
        api.resolve_model_path("toy")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_missing_part_names_the_install_command(parts, monkeypatch):
    _, split = parts
    broken = api.SplitModel(split.filename, (*split.parts[:1], ("wgkvtest_absent", "x.bin")), split.sha256, split.pip)
    monkeypatch.setitem(api.SPLIT_MODELS, "toy", broken)
    with pytest.raises(FileNotFoundError, match=r"'wgkvtest-absent', which is not installed.*wgkvtest-part1"):
        api.resolve_model_path("toy")
