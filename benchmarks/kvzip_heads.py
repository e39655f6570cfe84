"""KVzip's head-level mode on a real model: calibrate head scores once on held-out text, then
answer needle prompts keeping the stores of a fraction of the heads (the policy alone, admission
"all"), beside the full cache; accuracy and the measured KV ratio / bytes go to a JSON file.

    python benchmarks/kvzip_heads.py --out results/kvzip_heads_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--calibration-tokens", type=int, default=1024)
    ap.add_argument("--ratios", default="0.6,0.3")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]

    import wgkv_jax
    from wgkv_jax import policies as P
    from wgkv_jax.eval import make_task, score
    from wgkv_jax.infer.bench import log, machine, write_result

    model = wgkv_jax.load_model(args.model, layers="unrolled")  # a capacity per layer after eviction
    calib = make_task("ppl", model.tokenizer, args.calibration_tokens, seed=1000).prompt  # held-out essay text
    t0 = time.perf_counter()
    heads = wgkv_jax.kvzip_head_scores(model, [calib], window=args.window)
    calib_s = time.perf_counter() - t0
    log(f"calibrated {heads.shape} head scores in {calib_s:.1f} s")
    tasks = [make_task("niah", model.tokenizer, args.length, seed=i) for i in range(args.samples)]
    prompts = [t.prompt for t in tasks]
    rows = []
    for ratio in [None, *ratios]:
        kw = {}
        if ratio is not None:
            kw = dict(gate="all", cache=wgkv_jax.CacheConfig(window=args.window), room=0)
            kw["policy"] = P.KVzipHeads(head_scores=heads.tolist(), ratio=ratio)
        out = wgkv_jax.generate(model, prompts, max_new_tokens=24, chat=False, temperature=0.0, **kw)
        s = out.cache_stats
        acc = sum(score(t, text) for t, text in zip(tasks, out.texts, strict=True)) / len(tasks)
        rows.append(
            {
                "heads_kept": ratio,
                "accuracy": acc,
                "kv_ratio": s.kv_ratio,
                "kv_bytes": s.allocated_bytes,
                "full_bytes": s.full_cache_bytes,
                "predictions": out.texts,
            }
        )
        mib = s.allocated_bytes / 2**20
        log(f"heads kept {ratio}: niah {100 * acc:.0f}%  kv ratio {s.kv_ratio:.3f}  {mib:.1f} MiB")
    result = {
        "benchmark": "kvzip_heads",
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "calibration_s": calib_s,
        "head_scores": heads.tolist(),
        "results": rows,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
