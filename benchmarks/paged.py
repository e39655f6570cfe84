"""The paged global store vs the contiguous one on a real model: the same prompts (real essay text
with a needle), the same tokens, and the K/V bytes each allocates, with the shipped gate alone
and with a ragged eviction budget (H2O, one global budget over all layers and heads).

    python benchmarks/paged.py --out results/paged_cpu.json

The contiguous store gives every (layer, row, head) the capacity of the fullest one; the paged
store gives each head ceil(length / page) pages of one shared pool, plus spare pages for the
tokens decode may admit (`room` = max_new_tokens per head).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--new", type=int, default=16, help="new tokens per prompt")
    ap.add_argument("--samples", type=int, default=2)
    args = ap.parse_args(argv)

    import wgkv_jax
    from wgkv_jax import policies as P
    from wgkv_jax.eval import make_task, score
    from wgkv_jax.infer.bench import log, machine, write_result

    model = wgkv_jax.load_model(args.model)
    settings = {  # the model's shipped gate (its default CacheConfig), alone and with a ragged eviction
        "gate": {"gate": args.model},
        "gate+h2o-global@0.25": {"gate": args.model, "policy": P.get("h2o", budget=P.Global(P.KeepRatio(0.25)))},
    }
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        tasks = [make_task("niah", model.tokenizer, n, seed=i) for i in range(args.samples)]
        prompts = [t.prompt for t in tasks]
        for name, kw in settings.items():
            out = {}
            for paged in (None, args.page):
                t0 = time.perf_counter()
                res = wgkv_jax.generate(model, prompts, max_new_tokens=args.new, chat=False, paged=paged, **kw)
                out[paged] = (res, time.perf_counter() - t0)
            (dense, t_dense), (pag, t_paged) = out[None], out[args.page]
            row = {
                "tokens": n,
                "setting": name,
                "same_tokens": dense.tokens == pag.tokens,
                "accuracy": sum(score(t, p) for t, p in zip(tasks, pag.texts, strict=True)) / len(tasks),
                "kv_ratio": pag.cache_stats.kv_ratio,
                "stored_entries": pag.cache_stats.stored_entries,
                "contiguous_kv_bytes": dense.cache_stats.allocated_bytes,
                "paged_kv_bytes": pag.cache_stats.allocated_bytes,
                "paged_over_contiguous": pag.cache_stats.allocated_bytes / dense.cache_stats.allocated_bytes,
                "full_cache_bytes": dense.cache_stats.full_cache_bytes,
                "capacity_per_head": dense.cache_stats.capacity,
                "decode_tok_s_contiguous": args.samples * args.new / dense.decode_s,
                "decode_tok_s_paged": args.samples * args.new / pag.decode_s,
                "seconds": t_dense + t_paged,
            }
            rows.append(row)
            log(
                f"{n:>6} {name:<22} same tokens {row['same_tokens']} K/V {row['contiguous_kv_bytes'] / 2**20:.1f}"
                f" -> {row['paged_kv_bytes'] / 2**20:.1f} MiB ({row['paged_over_contiguous']:.2f}x; full cache "
                f"{row['full_cache_bytes'] / 2**20:.1f} MiB)  decode {row['decode_tok_s_contiguous']:.1f} -> "
                f"{row['decode_tok_s_paged']:.1f} tok/s"
            )
    result = {"benchmark": "paged global store", "machine": machine(), "model": args.model, "args": vars(args)}
    result["args"] = {k: str(v) for k, v in result["args"].items()}
    result["results"] = rows
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
