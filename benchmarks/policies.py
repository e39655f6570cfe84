"""What eviction costs at prefill: each policy's scoring + selection + compaction beside the prefill.

    python benchmarks/policies.py --out results/policies_cpu.json                   # SmolLM2, CPU
    python benchmarks/policies.py --lengths 2048,8192 --out results/policies_h100.json   # on a GPU
    python benchmarks/policies.py --preset llama-3.1-8b --lengths 8192 --out ...   # random weights
    python benchmarks/policies.py --layers unrolled --policies kvzip --out ...     # capacity per layer

For every context length, `generate_ids(..., max_new_tokens=1)` runs the dual cache (admission
"all", so every policy scores the whole prompt) without a policy and with each policy; its
stats["prefill_s"] covers the chunked prefill, the policy's scoring (for KVzip: the repeat passes)
and the eviction. overhead = policy - none, and `overhead_over_prefill` is KVzip's "about one
extra prefill" claim (reference/baselines.md 2.2). Each setting's first call (compilation) is
excluded; the median of `--repeats` calls is reported, every time kept in the JSON, with the KV
ratio and bytes measured from the resulting cache. `--preset` runs a model shape from
configs/models.py with random bf16 weights and random token ids (the costs do not depend on the
weights; KVzip's repeat prompts are then fixed ids).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

SETTINGS = {
    "none": None,
    "streaming_llm": ("streaming_llm", {}),
    "snapkv": ("snapkv", {}),
    "h2o": ("h2o", {}),
    "ahakv": ("ahakv", {}),
    "kvzip": ("kvzip", {}),  # Global budget (KVzip's "pair" level)
    "kvzip_per_head": ("kvzip", {"budget_kind": "per-head"}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default=None, help="a configs/models.py preset with random weights instead")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default=",".join(SETTINGS))
    ap.add_argument(
        "--layers", choices=("stacked", "unrolled"), default="stacked",
        help="unrolled: a ragged budget compacts each layer's store to its own capacity (PerLayerCache)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    names = args.policies.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:  # before the (slow) model load
        ap.error(f"unknown --policies {unknown}; choose from {list(SETTINGS)}")

    import wgkv_jax
    from wgkv_jax import policies as P
    from wgkv_jax.cache import evict
    from wgkv_jax.eval import make_needle_case
    from wgkv_jax.infer.bench import log, machine, write_result
    from wgkv_jax.infer.generate import generate_ids

    if args.preset is None:
        model = wgkv_jax.load_model(args.model)
        params, cfg, tok = model.params, model.config, model.tokenizer
        first, nxt = (tok.encode(t, add_special_tokens=False) for t in (evict.KVZIP_FIRST, evict.KVZIP_NEXT))
    else:
        import numpy as np

        from configs.models import PRESETS
        from wgkv_jax.infer.bench import random_params

        cfg, tok = PRESETS[args.preset], None
        params = random_params(cfg)
        first, nxt = list(range(10, 20)), list(range(20, 35))
    if args.layers == "unrolled":
        from wgkv_jax.model.transformer import unstack_tree

        params = dict(params, layers=unstack_tree(params["layers"], cfg.n_layers))
    if "none" not in names:
        names.insert(0, "none")  # the baseline every overhead is measured against
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        if tok is None:
            ids = np.random.default_rng(n).integers(100, cfg.vocab_size, n).tolist()
        else:
            ids = tok.encode(make_needle_case(tok, n + 64, depth=0.5, seed=0).prompt)[:n]
        for name in names:
            policy = None
            if SETTINGS[name] is not None:
                pname, opts = SETTINGS[name]
                policy = P.get(pname, keep_ratio=args.keep_ratio)
                if opts.get("budget_kind") == "per-head":
                    policy = P.KVzip(budget=P.PerHead(P.KeepRatio(args.keep_ratio)))
            cache = wgkv_jax.CacheConfig(window=args.window, chunk=args.chunk, capacity_fraction=1.0)
            kw = dict(max_new_tokens=1, cache=cache, admission=wgkv_jax.FixedAdmission("all"), policy=policy)
            if isinstance(policy, P.KVzip):
                kw["kvzip_prompt_ids"] = (first, nxt)
            times = []
            for i in range(args.repeats + 1):  # the first call compiles
                _, _, stats = generate_ids(params, cfg, [ids], **kw)
                if i:
                    times.append(stats["prefill_s"] * 1e3)
            s = stats["cache"]
            row = {
                "tokens": n,
                "policy": name,
                "prefill_ms": statistics.median(times),
                "prefill_ms_all": times,
                "kv_ratio": s.kv_ratio,
                "kv_bytes": s.allocated_bytes,
                "capacity": s.capacity,
                "capacities": list(stats.get("capacities", ())),
                "policy_evicted": s.policy_evicted,
            }
            rows.append(row)
            log(f"{n} tokens {name:15s} prefill {row['prefill_ms']:9.1f} ms  kv ratio {s.kv_ratio:.3f}")
    for row in rows:
        base = next(r for r in rows if r["tokens"] == row["tokens"] and r["policy"] == "none")["prefill_ms"]
        row["overhead_ms"] = row["prefill_ms"] - base
        row["overhead_over_prefill"] = row["overhead_ms"] / base
    out = {
        "benchmark": "policies",
        "machine": machine(),
        "model": args.preset or args.model,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": rows,
    }
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
