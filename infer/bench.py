"""Long-context benchmark: WG-KV dual cache vs full cache on a Llama-3.1-8B-shaped stack (GPU).

python -m infer.bench --contexts 32768 65536 131072 --out results/long_context_h100.json
python -m infer.bench --plot-only results/long_context_h100.json      # redraw the PNG
python -m infer.bench --merge a.json b.json --out results/long_context_h100.json   # runs -> one JSON

Random bf16 weights and random admission (20% beyond the window by default); see
`wgkv_jax.infer.bench` for what each part measures. Results: JSON (with device and versions)
and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARTS = ("check", "attention", "e2e", "batch")


def parse_args(argv=None) -> argparse.Namespace:
    from wgkv_jax.infer.bench import LAYERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--e2e-contexts", type=int, nargs="*", default=None, help="end-to-end only at these lengths")
    p.add_argument("--batch-contexts", type=int, nargs="*", default=None, help="batch part only at these lengths")
    p.add_argument("--rate", type=float, default=0.2, help="random admission rate beyond the window")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048, help="dual-cache prefill chunk")
    p.add_argument("--capacity-fraction", type=float, default=0.22)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hbm-peak-gbps", type=float, default=3350.0, help="HBM peak for the decode floor (H100 SXM)")
    p.add_argument("--config", default="llama-3.1-8b", choices=["llama-3.1-8b", "tiny"], help="tiny: CPU smoke run")
    p.add_argument("--batch-memory", type=float, default=None, help="GiB for the batch caches (default: 85%% of free)")
    p.add_argument(
        "--layers", default="fused", choices=LAYERS,
        help="weight layout of the end-to-end and batch parts (prefill and decode): one buffer per layer with "
        "q/k/v and gate/up fused (default), unfused, or stacked and scanned",
    )  # fmt: skip
    p.add_argument("--no-sweep", action="store_true", help="skip the tile sweeps at the first context (GPU)")
    p.add_argument("--out", type=Path, default=Path("results/long_context.json"))
    p.add_argument("--plot-only", type=Path, default=None, help="redraw the PNG of an existing JSON")
    p.add_argument(
        "--merge", type=Path, nargs="+", default=None,
        help="merge the JSONs of separate runs (other parts or contexts, same settings) into --out, with its PNG",
    )  # fmt: skip
    args = p.parse_args(argv)
    for n in args.contexts:
        if n < 2 * args.chunk or n % args.chunk:
            p.error(f"--contexts {n}: must be a multiple of --chunk {args.chunk} and at least two chunks")
    if not 0.0 < args.rate <= 1.0:
        p.error(f"--rate {args.rate} must be in (0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from configs.models import LLAMA31_8B, TINY_BENCH
    from wgkv_jax.infer import bench

    if args.plot_only:
        bench.plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0
    if args.merge:
        missing = [str(f) for f in args.merge if not f.is_file()]
        if missing:
            print(f"--merge: no such file: {', '.join(missing)}", file=sys.stderr)
            return 2
        merged = bench.merge_results([json.loads(f.read_text()) for f in args.merge], [f.name for f in args.merge])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=1))
        bench.plot(merged, args.out.with_suffix(".png"))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda res: args.out.write_text(json.dumps(res, indent=1))  # noqa: E731  after every context
    result = bench.run(
        args.contexts, args.parts, rate=args.rate, window=args.window, chunk=args.chunk,
        capacity_fraction=args.capacity_fraction, steps=args.steps, repeats=args.repeats,
        hbm_peak_gbps=args.hbm_peak_gbps, e2e_contexts=args.e2e_contexts, batch_contexts=args.batch_contexts,
        cfg=LLAMA31_8B if args.config == "llama-3.1-8b" else TINY_BENCH,
        batch_memory=None if args.batch_memory is None else int(args.batch_memory * 2**30),
        layers=args.layers, on_update=save, sweep=not args.no_sweep,
    )  # fmt: skip
    save(result)
    try:
        bench.plot(result, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot (pip install 'wgkv-jax[eval]')", file=sys.stderr)
    print(json.dumps(result["contexts"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
