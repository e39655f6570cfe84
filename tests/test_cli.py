"""End-to-end: the README's generation commands on the real embedded model (slow: ~15 s each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "infer.generate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_generate_cli_completion_and_chat():
    done = run_cli("--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0", "--no-chat")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "decode" in done.stderr and "[dual cache] KV entries" in done.stderr  # the shipped gate by default
    assert "admitted % per layer" in done.stderr
    done = run_cli("--prompt", "What is the capital of France?", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_generate_cli_errors(tmp_path):
    done = run_cli("--prompt-file", str(tmp_path / "absent.txt"))
    assert done.returncode == 2 and "absent.txt does not exist" in done.stderr
    done = run_cli("--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert done.returncode == 2 and "nowhere" in done.stderr and "does not exist" in done.stderr
    done = run_cli()
    assert done.returncode == 2 and "exactly one of --prompt or --prompt-file" in done.stderr
    done = run_cli("--prompt", "hi", "--ckpt", str(tmp_path / "no_gate.safetensors"))
    assert done.returncode == 2 and "gate checkpoint not found" in done.stderr
    done = run_cli("--prompt", "hi", "--window", "100")
    assert done.returncode == 2 and "window=100 must be a positive multiple of the kernel block size 16" in done.stderr


@pytest.mark.slow
def test_generate_cli_full_cache_and_fixed_admission():
    args = ("--prompt", "The capital of France is", "--max-new-tokens", "6", "--temperature", "0", "--no-chat")
    done = run_cli(*args, "--full-cache")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "[full cache]" in done.stderr
    done = run_cli(*args, "--ckpt", "none", "--window", "16", "--chunk", "16", "--capacity", "16")
    assert done.returncode == 0, done.stderr
    assert "W=16 C=16" in done.stderr and "admitted % per layer: 0 0 0" in done.stderr


@pytest.mark.slow
def test_real_model_batch_of_chat_prompts(smollm2):
    import wgkv_jax

    out = wgkv_jax.generate(
        smollm2, ["What is the capital of France?", "What is 2 + 2? Answer with a number."], max_new_tokens=16
    )
    assert "Paris" in out.texts[0]
    assert "4" in out.texts[1]
    assert all(out.finished)  # both answers end with <|im_end|> well before 16 tokens


@pytest.mark.slow
def test_smollm2_preset_matches_gguf_metadata(smollm2):
    import dataclasses

    from configs.models import SMOLLM2_135M

    got = dataclasses.replace(smollm2.config, name=SMOLLM2_135M.name, rms_eps=SMOLLM2_135M.rms_eps)
    assert got == SMOLLM2_135M
    assert abs(smollm2.config.rms_eps - SMOLLM2_135M.rms_eps) < 1e-9


@pytest.mark.slow
def test_generate_cli_paged_store():
    done = run_cli("--prompt", "The capital of France is", "--max-new-tokens", "8", "--no-chat", "--paged", "32")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "[dual cache] KV entries" in done.stderr
    done = run_cli("--prompt", "The capital of France is", "--max-new-tokens", "2", "--no-chat", "--paged", "12")
    assert done.returncode == 2 and "page=12: expected a power of two" in done.stderr
