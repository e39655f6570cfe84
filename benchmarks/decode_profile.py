"""Where a batch-1 decode step's time goes on the GPU: kernel time, idle gaps, and the kernels.

    python benchmarks/decode_profile.py --context 131072 --out results/decode_profile_h100.json
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python benchmarks/decode_profile.py ...   # compare flags
    python benchmarks/decode_profile.py --smoke --out /tmp/decode_profile.json       # CPU, tiny model

(After `pip install -e .`; from a bare checkout, prefix `PYTHONPATH=.` so that `configs` imports.)

The Llama-3.1-8B-shaped stack of `infer.bench` (random bf16 weights, one buffer per layer) with a
full cache and a dual cache filled with random K/V of the right lengths (`synthetic_full`,
`synthetic_dual`: 20% random admission beyond the window). For each cache: ms per token of the
on-device decode loop (untraced), then `--trace-steps` steps under `jax.profiler`, whose device
events give the busy time (the union of kernel intervals), the idle gaps between kernels, the
kernels launched per step and the kernels that take the time. A step with many short kernels
and large gaps is launch-bound; one whose busy time is near its memory floor is not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from configs.models import LLAMA31_8B, TINY_BENCH
from wgkv_jax.cache.admission import FixedAdmission
from wgkv_jax.cache.dual import CacheConfig, DualAttend
from wgkv_jax.cache.full import FullAttend
from wgkv_jax.infer import generate as gen
from wgkv_jax.infer.bench import (
    GREEDY,
    _decode_ms,
    _ragged,
    kernel_summary,
    log,
    machine,
    model_params,
    nbytes,
    synthetic_dual,
    synthetic_full,
    trace_kernels,
    write_result,
)
from wgkv_jax.model.transformer import fuse_layer


def traced_decode(params, cfg, cache, n_tokens, attend, max_steps: int, steps: int) -> tuple[dict, object]:
    """Trace `steps` tokens of the decode loop compiled for `max_steps` (by `_decode_ms`: no
    compilation inside the trace) and summarise its kernels."""
    b = jax.tree.leaves(cache)[0].shape[1]
    first = jnp.zeros((b,), jnp.int32)
    lengths = jnp.full((b,), n_tokens, jnp.int32)
    key = jax.random.PRNGKey(0)

    def loop(cache):  # returns (tokens, the updated cache): the loop donates its input
        return gen.decode_loop(params, cfg, cache, first, lengths, key, GREEDY, max_steps, (), jnp.int32(steps), attend)

    events, (_, cache) = trace_kernels(loop, cache)
    out = kernel_summary(events, steps - 1)  # the first token comes from the prefill: steps - 1 decode steps
    return out, cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (untraced)")
    p.add_argument("--trace-steps", type=int, default=8, help="decode steps traced")
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--capacity-fraction", type=float, default=0.22)
    p.add_argument("--hbm-peak-gbps", type=float, default=3350.0)
    p.add_argument("--caches", nargs="+", default=["full", "dual"], choices=["full", "dual"])
    p.add_argument(
        "--layouts", nargs="+", default=["unrolled", "fused"], choices=["unrolled", "fused"],
        help="weight layouts (`load_model(layers=...)`): one buffer per layer, or with q/k/v and gate/up fused",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, 1024 tokens, 4 steps")
    p.add_argument("--out", default="results/decode_profile.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.context, args.steps, args.trace_steps = 1024, 4, 2
    cfg = TINY_BENCH if args.smoke else LLAMA31_8B
    setting = CacheConfig(window=args.window, capacity_fraction=args.capacity_fraction)
    n, steps = args.context, args.steps
    unrolled = model_params(cfg, "unrolled")
    layouts = {"unrolled": unrolled}
    if "fused" in args.layouts:
        layouts["fused"] = dict(unrolled, layers=[fuse_layer(p) for p in unrolled["layers"]])
    weight_bytes = nbytes(unrolled)
    result = {
        "machine": machine() | {"xla_flags": os.environ.get("XLA_FLAGS", "")},
        "settings": vars(args) | {"weight_bytes": weight_bytes},
        "caches": {},
    }
    for name in args.caches:
        if name == "full":
            kv_read = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * (n + 1)
        for layout in args.layouts:
            log(f"{name} cache at {n} tokens, {layout} layers")
            params = layouts[layout]
            if name == "full":
                cache = synthetic_full(cfg, 1, gen.cache_bucket(n + steps))
                attend = FullAttend("decode", _ragged())
            else:
                cache = synthetic_dual(cfg, 1, n, setting, args.rate)
                adm = FixedAdmission("random", rate=args.rate, seed=0)
                attend = DualAttend(adm, impl=_ragged(), batched_promotion=True)
                per_entry = 2 * cfg.head_dim * 2
                kv_read = (int(jnp.sum(cache.length)) + cfg.n_layers * cfg.n_kv_heads * args.window) * per_entry
            t0 = time.perf_counter()
            ms, cache = _decode_ms(params, cfg, cache, n, attend, steps)
            row = {"decode_ms": ms, "compile_and_time_s": time.perf_counter() - t0}
            row["floor_ms"] = (weight_bytes + kv_read) / args.hbm_peak_gbps / 1e6
            row["of_floor"] = row["floor_ms"] / ms
            prof, cache = traced_decode(params, cfg, cache, n, attend, steps, min(args.trace_steps, steps))
            row["profile"] = prof
            summary = {k: prof[k] for k in ("busy_ms_per_step", "gap_ms_per_step", "kernels_per_step")}
            log(json.dumps({k: v for k, v in row.items() if k != "profile"} | summary))
            result["caches"][f"{name}_{layout}"] = row
            del cache
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
