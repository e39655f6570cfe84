"""Gate-training throughput and peak memory: blocked soft-gated attention vs the dense reference.

    python benchmarks/soft_attention.py --out results/soft_attention_gpu.json [--lengths 2048 4096 8192 32768]

Runs the full WG-KV training step (teacher forward + soft-gated student forward/backward + AdamW
on the gates) for a SmolLM2-135M-shaped model with random bf16 weights (no download), batch 1,
once per (sequence length, attention path), each in a fresh subprocess so the device's peak
memory belongs to that configuration alone. Out-of-memory is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one(t: int, impl: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from configs.models import SMOLLM2_135M
    from wgkv_jax import gates
    from wgkv_jax.model import init_params
    from wgkv_jax.train import SoftGateAttend
    from wgkv_jax.train.step import make_optimizer, train_step

    cfg = SMOLLM2_135M
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    params = init_params(cfg, jax.random.PRNGKey(0), dtype)
    gate = gates.make("wgkv", cfg)
    gp = gates.init_stacked(gate, cfg, jax.random.PRNGKey(1))
    attend = SoftGateAttend(gate, window=256, block=512, reference=impl == "dense")
    opt = make_optimizer(1e-3, 0.01, 100, 0.1)
    state = opt.init(gp)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, t), 0, cfg.vocab_size)
    kw = dict(cfg=cfg, attend=attend, optimizer=opt, lam=0.16, tau=0.1)
    t0 = time.perf_counter()
    gp, state, m = train_step(gp, state, params, tokens, **kw)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        gp, state, m = train_step(gp, state, params, tokens, **kw)
    jax.block_until_ready(m["loss"])
    step_s = (time.perf_counter() - t0) / steps
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "T": t,
        "impl": impl,
        "step_s": step_s,
        "tokens_per_s": t / step_s,
        "compile_s": compile_s,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "loss": float(m["loss"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/soft_attention.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 32768])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--one", nargs=2, metavar=("T", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.steps)))
        return 0
    import jax

    rows = []
    for t in args.lengths:
        for impl in ("blocked", "dense"):
            done = subprocess.run(
                [sys.executable, __file__, "--one", str(t), impl, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                oom = "RESOURCE_EXHAUSTED" in done.stderr or "out of memory" in done.stderr.lower()
                row = {"T": t, "impl": impl, "error": "OOM" if oom else done.stderr.strip().splitlines()[-1][:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "soft_attention_train_step",
        "model": "SmolLM2-135M shapes, random weights, batch 1",
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| T | blocked tok/s | blocked peak GiB | dense tok/s | dense peak GiB |\n|---|---|---|---|---|")
    for t in args.lengths:
        b, d = (next(r for r in rows if r["T"] == t and r["impl"] == i) for i in ("blocked", "dense"))
        fmt = lambda r: (f"{r['tokens_per_s']:.0f}", f"{r['peak_gib']:.1f}") if "error" not in r else (r["error"], "-")  # noqa: E731
        print(f"| {t} | {' | '.join(fmt(b))} | {' | '.join(fmt(d))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
