"""Soft-gated training attention, forward + backward: the Pallas flash kernels vs cuDNN causal attention.

    python benchmarks/soft_flash.py --out results/soft_flash_h100.json [--lengths 8192 16384 32768]
    python benchmarks/soft_flash.py --tiny --out /tmp/soft_flash_tiny.json   # CPU smoke test (interpret mode)
    python benchmarks/soft_flash.py --no-sweep --lengths 8192 --out results/tmp/soft_flash_quick.json  # default tiles

For each sequence length and two attention shapes (Llama-3.1-8B: 32 query heads, 8 KV heads,
head_dim 128; SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64), batch 1, bf16, window 256,
random gates in (2 eps, 1], times (jitted, median of --repeats after --warmup) the forward and the
forward + backward (jax.vjp with a random cotangent; gradients in q, k, v and, for the gated paths,
g) of
  (a) cuDNN causal flash attention, `jax.nn.dot_product_attention(implementation="cudnn")` (no
      gates: the speed of light we compare against),
  (b) `kernels.soft_flash.soft_flash_attention` with a few candidate tilings: forward tiles swept
      on the forward alone, then backward tiles on forward + backward with the best forward,
  (c) the blocked XLA path `attention.soft_gate.soft_gated_attention`.
Throughput is in causal TFLOP/s: forward = 2 * 2 * B * H * T^2 * E / 2 (two matmuls, half the
pairs), forward + backward = 3.5 x forward, for every path (the XLA path computes all pairs, but is
credited with the causal count too). Then a correctness check at --check-length (2048): max
|error| / max |reference| of the output and the four gradients against the float32 reference
(`soft_gated_attention_reference`), for bf16 and float32 inputs. Every configuration runs in a
try/except, so an out-of-memory or a compile failure is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wgkv_jax.attention.soft_gate import DEFAULT_EPS, soft_gated_attention, soft_gated_attention_reference
from wgkv_jax.infer.bench import timing
from wgkv_jax.kernels.ragged import Tiling
from wgkv_jax.kernels.soft_flash import FlashTiling, default_tiling, soft_flash_attention

SHAPES = {  # name: (query heads, KV heads, head_dim)
    "llama3.1-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
TINY_SHAPES = {"tiny-gqa4": (4, 1, 32), "tiny-gqa3": (6, 2, 16)}
FLOPS_CONVENTION = (
    "causal: forward = 2 * 2 * B * H * T^2 * E / 2; forward + backward = 3.5 * forward, for every path "
    "(the XLA path computes all T^2 pairs but is credited with the causal count)"
)


def forward_candidates(e: int, tiny: bool, sweep: bool = True) -> dict[str, Tiling]:
    if not sweep:
        return {"default": FlashTiling().forward if tiny else default_tiling(e).forward}
    if tiny:
        return {"32x16": Tiling(block_m=32, block_k=16), "16x32": Tiling(block_m=16, block_k=32)}
    w = 4 if e <= 64 else 8
    return {
        "default": default_tiling(e).forward,
        "128x64_w4_s3": Tiling(block_m=128, block_k=64, num_warps=4, num_stages=3),
        "128x32_w4_s3": Tiling(block_m=128, block_k=32, num_warps=4, num_stages=3),
        "64x64_w4_s3": Tiling(block_m=64, block_k=64, num_warps=4, num_stages=3),
        "128x128_w8_s2": Tiling(block_m=128, block_k=128, num_warps=8, num_stages=2),
        f"64x128_w{w}_s2": Tiling(block_m=64, block_k=128, num_warps=w, num_stages=2),
    }


def backward_candidates(e: int, tiny: bool, sweep: bool = True) -> dict[str, tuple[Tiling, Tiling]]:
    """name: (dkv tiling: block_k keys per program, block_m rows per step; dq tiling)."""
    if not sweep:
        d = FlashTiling() if tiny else default_tiling(e)
        return {"default": (d.dkv, d.dq)}
    if tiny:
        return {"32x32": (Tiling(block_m=32, block_k=32),) * 2}
    d = default_tiling(e)
    w = 4 if e <= 64 else 8
    return {
        "default": (d.dkv, d.dq),
        "64x64_w4": (Tiling(block_m=64, block_k=64, num_warps=4), Tiling(block_m=64, block_k=64, num_warps=4)),
        "kv128x32_q128x32_w8": (  # the Triton tutorial's split: many keys per dK/dV program, many rows per dQ one
            Tiling(block_m=32, block_k=128, num_warps=8, num_stages=2),
            Tiling(block_m=128, block_k=32, num_warps=8, num_stages=2),
        ),
        f"kv64x32_q64x32_w{w}_s3": (
            Tiling(block_m=32, block_k=64, num_warps=w, num_stages=3),
            Tiling(block_m=64, block_k=32, num_warps=w, num_stages=3),
        ),
        "32x32_w4_s3": (
            Tiling(block_m=32, block_k=32, num_warps=4, num_stages=3),
            Tiling(block_m=32, block_k=32, num_warps=4, num_stages=3),
        ),
    }


def inputs(t: int, heads: int, kv: int, e: int, dtype, seed: int = 0):
    g = heads // kv
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (1, t, kv, g, e), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (1, t, kv, e), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (1, t, kv, e), jnp.float32).astype(dtype)
    gate = jnp.exp(jax.random.uniform(ks[3], (1, kv, t), minval=np.log(2 * DEFAULT_EPS), maxval=0.0))
    ct = jax.random.normal(ks[4], (1, t, kv, g, e), jnp.float32).astype(dtype)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    return q, k, v, gate, pos, ct


def paths(window: int, interpret: bool, baseline_impl: str):
    """name -> (forward fn(q, k, v, g, pos), number of differentiated inputs)."""

    def cudnn(q, k, v, g, pos):
        b, t, kv, gg, e = q.shape
        o = jax.nn.dot_product_attention(
            q.reshape(b, t, kv * gg, e), k, v, is_causal=True, implementation=baseline_impl
        )
        return o.reshape(q.shape)

    def xla(q, k, v, g, pos):
        return soft_gated_attention(q, k, v, g, pos, window=window)

    def flash(tiling):
        return lambda q, k, v, g, pos: soft_flash_attention(
            q, k, v, g, pos, window=window, tiling=tiling, interpret=interpret
        )

    return cudnn, xla, flash


def fwd_bwd(f, n_diff: int):
    """jit(q, k, v, g, pos, ct -> gradients of <f(...), ct> in the first n_diff inputs)."""

    def run(q, k, v, g, pos, ct):
        diff = (q, k, v, g)[:n_diff]
        rest = (q, k, v, g)[n_diff:]
        _, vjp = jax.vjp(lambda *x: f(*x, *rest, pos), *diff)
        return vjp(ct)

    return jax.jit(run)


def measure(name, f, n_diff, args, flops_fwd, opts, *, fwd=True, bwd=True) -> dict:
    """Time the forward (fwd) and/or forward + backward (bwd) of f; errors are recorded in the row."""
    row = {"path": name}
    try:
        if fwd:
            fw = timing(jax.jit(f), *args[:5], warmup=opts.warmup, repeats=opts.repeats)
            row.update({"fwd_ms": fw["ms"], "fwd_tflops": flops_fwd / fw["ms"] / 1e9})
        if bwd:
            fb = timing(fwd_bwd(f, n_diff), *args, warmup=opts.warmup, repeats=opts.repeats)
            row.update({"fwd_bwd_ms": fb["ms"], "fwd_bwd_ms_min": fb["ms_min"], "first_call_s": fb["first_call_s"]})
            row["fwd_bwd_tflops"] = 3.5 * flops_fwd / fb["ms"] / 1e9
    except Exception as exc:  # OOM, compile failures: record and go on
        row["error"] = _error(exc)
    print(json.dumps(row), flush=True)
    return row


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "OOM: " + text[:300]
    return text[:600]


def bench_length(shape: str, t: int, opts, baseline_impl: str) -> dict:
    heads, kv, e = (TINY_SHAPES if opts.tiny else SHAPES)[shape]
    flops_fwd = 2 * 2 * 1 * heads * t * t * e / 2
    args = inputs(t, heads, kv, e, jnp.bfloat16)
    cudnn, xla, flash = paths(opts.window, opts.tiny, baseline_impl)
    result = {"shape": shape, "T": t, "heads": heads, "kv_heads": kv, "head_dim": e, "rows": []}
    base = measure(f"baseline_{baseline_impl}", cudnn, 3, args, flops_fwd, opts)
    result["rows"].append(base)

    fwd_rows = {}
    for name, tl in forward_candidates(e, opts.tiny, opts.sweep).items():
        tiling = FlashTiling(forward=tl)
        fwd_rows[name] = measure(f"soft_flash fwd={name}", flash(tiling), 4, args, flops_fwd, opts, bwd=False)
        result["rows"].append(fwd_rows[name])
    ok = {n: r for n, r in fwd_rows.items() if "fwd_ms" in r}
    best_fwd = min(ok, key=lambda n: ok[n]["fwd_ms"]) if ok else None
    best = None
    if best_fwd is not None:
        fwd_tl = forward_candidates(e, opts.tiny, opts.sweep)[best_fwd]
        for name, (dkv, dq) in backward_candidates(e, opts.tiny, opts.sweep).items():
            tiling = FlashTiling(fwd_tl, dkv, dq)
            row = measure(f"soft_flash fwd={best_fwd} bwd={name}", flash(tiling), 4, args, flops_fwd, opts, fwd=False)
            result["rows"].append(row)
            if "fwd_bwd_ms" in row and (best is None or row["fwd_bwd_ms"] < best["fwd_bwd_ms"]):
                best = row
    result["rows"].append(measure("xla_blocked", xla, 4, args, flops_fwd, opts))
    if best is not None:
        result["best_soft_flash"] = best["path"]
        result["soft_flash_fwd_bwd_ms"] = best["fwd_bwd_ms"]
        result["soft_flash_fwd_bwd_tflops"] = best["fwd_bwd_tflops"]
        if "fwd_bwd_ms" in base:
            result["ours_over_baseline_throughput"] = base["fwd_bwd_ms"] / best["fwd_bwd_ms"]
    if best_fwd is not None and "fwd_ms" in base:
        result["best_soft_flash_fwd"] = best_fwd
        result["ours_over_baseline_fwd_throughput"] = base["fwd_ms"] / ok[best_fwd]["fwd_ms"]
    return result


def _out_and_grads(fn, pos, q, k, v, g, ct):
    out, vjp = jax.vjp(lambda *x: fn(*x, pos), q, k, v, g)
    return (out, *vjp(ct))


def check_tilings(e: int, tiny: bool, sweep: bool) -> dict[str, FlashTiling]:
    """The default tiling, and (sweep) every candidate, each with the default for the other pass(es)."""
    d = FlashTiling() if tiny else default_tiling(e)
    tilings = {"default": d}
    if sweep:
        for name, tl in forward_candidates(e, tiny).items():
            tilings[f"fwd={name}"] = FlashTiling(tl, d.dkv, d.dq)
        for name, (dkv, dq) in backward_candidates(e, tiny).items():
            tilings[f"bwd={name}"] = FlashTiling(d.forward, dkv, dq)
    return tilings


def check(shape: str, t: int, opts) -> list[dict]:
    """Max relative error (max |err| / max |ref|) of out, dq, dk, dv, dg vs the float32 reference:
    default tiling in bf16 and float32, every candidate tiling in bf16."""
    heads, kv, e = (TINY_SHAPES if opts.tiny else SHAPES)[shape]
    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        q, k, v, g, pos, ct = inputs(t, heads, kv, e, dtype, seed=1)

        try:
            ref = functools.partial(soft_gated_attention_reference, window=opts.window)
            with jax.default_matmul_precision("highest"):
                want = jax.jit(functools.partial(_out_and_grads, ref, pos))(
                    *(x.astype(jnp.float32) for x in (q, k, v, g, ct))
                )
        except Exception as exc:
            rows.append({"shape": shape, "T": t, "dtype": jnp.dtype(dtype).name, "error": "reference: " + _error(exc)})
            continue
        tilings = check_tilings(e, opts.tiny, opts.sweep)
        for name, tiling in tilings.items() if dtype == jnp.bfloat16 else [("default", tilings["default"])]:
            row = {"shape": shape, "T": t, "dtype": jnp.dtype(dtype).name, "window": opts.window, "tiling": name}
            try:
                fn = functools.partial(soft_flash_attention, window=opts.window, tiling=tiling, interpret=opts.tiny)
                got = jax.jit(functools.partial(_out_and_grads, fn, pos))(q, k, v, g, ct)
                for what, a, b in zip(("out", "dq", "dk", "dv", "dg"), got, want, strict=True):
                    a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b)
                    row[f"{what}_rel_err"] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                    if not np.all(np.isfinite(a)):
                        row[f"{what}_nonfinite"] = True
            except Exception as exc:
                row["error"] = _error(exc)
                traceback.print_exc()
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/soft_flash.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--shapes", nargs="+", default=None, help=f"subset of {', '.join(SHAPES)}")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-length", type=int, default=2048, help="T of the correctness check (0: skip)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", help="default tilings only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: T=256, tiny shapes, interpret mode")
    opts = ap.parse_args()
    if opts.tiny:
        opts.lengths, opts.check_length = [256], 128
        opts.window, opts.repeats, opts.warmup = 32, 2, 1
    shapes = opts.shapes or list(TINY_SHAPES if opts.tiny else SHAPES)
    gpu = jax.default_backend() == "gpu"
    baseline_impl = "cudnn" if gpu else "xla"  # cuDNN exists on GPUs only; the smoke test times XLA's
    result = {
        "benchmark": "soft_flash_attention_fwd_bwd",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "batch": 1,
        "dtype": "bfloat16",
        "window": opts.window,
        "eps": DEFAULT_EPS,
        "baseline": f"jax.nn.dot_product_attention(is_causal=True, implementation={baseline_impl!r}), no gates",
        "flops_convention": FLOPS_CONVENTION,
        "timing": f"jit, block_until_ready, median of {opts.repeats} after {opts.warmup} warmup calls",
        "interpret": opts.tiny,
        "results": [],
        "check": [],
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=2))

    if opts.check_length:
        for shape in shapes:
            result["check"].extend(check(shape, opts.check_length, opts))
            save()
    for shape in shapes:
        for t in opts.lengths:
            try:
                result["results"].append(bench_length(shape, t, opts, baseline_impl))
            except Exception as exc:
                result["results"].append({"shape": shape, "T": t, "error": _error(exc)})
            save()
    print("| shape | T | baseline ms | soft_flash ms | TFLOP/s (ours) | ours/baseline | XLA blocked ms |")
    print("|---|---|---|---|---|---|---|")
    for r in result["results"]:
        base = next((x for x in r.get("rows", []) if x["path"].startswith("baseline")), {})
        xla = next((x for x in r.get("rows", []) if x["path"] == "xla_blocked"), {})
        fmt = lambda x, k: f"{x[k]:.2f}" if k in x else x.get("error", "-")[:20]  # noqa: E731
        print(
            f"| {r['shape']} | {r['T']} | {fmt(base, 'fwd_bwd_ms')} | {fmt(r, 'soft_flash_fwd_bwd_ms')} | "
            f"{fmt(r, 'soft_flash_fwd_bwd_tflops')} | {fmt(r, 'ours_over_baseline_throughput')} | "
            f"{fmt(xla, 'fwd_bwd_ms')} |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
