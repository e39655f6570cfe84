"""Where one dual-cache prefill chunk's time goes on the GPU, late in a long prompt.

    python benchmarks/prefill_profile.py --context 131072 --chunk 2048 --out results/prefill_profile_h100.json
    python benchmarks/prefill_profile.py --smoke --out /tmp/prefill_profile.json   # CPU, tiny model

(After `pip install -e .`; from a bare checkout, prefix `PYTHONPATH=.` so that `configs` imports.)

The Llama-3.1-8B-shaped stack of `infer.bench` (random bf16 weights in the `--layers` layout)
and a dual cache as a chunked prefill of `context - chunk` tokens leaves it (`synthetic_dual`:
random K/V, 20% random admission beyond the window). The chunk that ends the prompt is timed
(wall ms, untraced), then traced under `jax.profiler`: busy time, idle gaps, kernels launched
and the kernels that take the time. The same chunk with attention skipped (`NoAttention`, the
cache left alone) gives the work no attention kernel can remove, so
`dual - no_attention - 32 x attention-only` is what the dual cache's own bookkeeping (the gate,
the promotion of admitted entries into the global store, the ring writes) costs per chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.models import LLAMA31_8B, TINY_BENCH
from wgkv_jax.cache.admission import FixedAdmission
from wgkv_jax.cache.dual import CacheConfig, DualAttend
from wgkv_jax.infer import generate as gen
from wgkv_jax.infer.bench import (
    GREEDY,
    LAYERS,
    NoAttention,
    dual_prefill_impl,
    kernel_summary,
    log,
    machine,
    model_params,
    synthetic_dual,
    trace_kernels,
    write_result,
)


def chunk_profile(params, cfg, state, tokens, start: int, attend, repeats: int) -> tuple[dict, object]:
    """Wall ms of prefill chunks at positions start, start + chunk, ... (the state is donated and
    carried on, so every call is a real next chunk), then one traced chunk's kernel summary."""
    b, chunk = tokens.shape
    key = jax.random.PRNGKey(0)

    def call(state, i):
        pos = jnp.broadcast_to(start + i * chunk + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        return gen.prefill_chunk(params, cfg, state, tokens, pos, key, GREEDY, attend)

    first, state = call(state, 0)  # compile
    first.block_until_ready()
    times = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        first, state = call(state, i)
        first.block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
    events, (_, state) = trace_kernels(lambda s: call(s, repeats + 1), state)
    return {"wall_ms": float(np.median(times)), "wall_ms_all": times} | kernel_summary(events, 1, top=20), state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=131072, help="prompt length the profiled chunks end near")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="chunks timed untraced (each a further chunk)")
    p.add_argument("--rate", type=float, default=0.2)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--capacity-fraction", type=float, default=0.22)
    p.add_argument("--layers", default="fused", choices=LAYERS, help="weight layout (infer.bench --layers)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, 4096 tokens, chunks of 512")
    p.add_argument("--out", default="results/prefill_profile.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.context, args.chunk, args.repeats = 4096, 512, 1
    if args.context < (args.repeats + 3) * args.chunk:
        p.error(f"--context {args.context}: needs at least {args.repeats + 3} chunks of {args.chunk}")
    cfg = TINY_BENCH if args.smoke else LLAMA31_8B
    setting = CacheConfig(window=args.window, chunk=args.chunk, capacity_fraction=args.capacity_fraction)
    params = model_params(cfg, args.layers)
    start = args.context - (args.repeats + 2) * args.chunk  # the profiled chunks end at the context
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.chunk)), jnp.int32)
    impl = dual_prefill_impl()
    attends = {
        "dual": DualAttend(FixedAdmission("random", rate=args.rate, seed=0), impl=impl),
        "no_attention": NoAttention(),
    }
    result = {"machine": machine(), "settings": vars(args) | {"start": start, "impl": impl}, "chunks": {}}
    # the global store sized for the whole context, as the end-to-end prefill sizes it
    sized = dataclasses.replace(setting, capacity=setting.resolve_capacity(args.context))
    for name, attend in attends.items():
        log(f"{name}: chunks of {args.chunk} from position {start}")
        state = synthetic_dual(cfg, 1, start, sized, args.rate)
        row, state = chunk_profile(params, cfg, state, tokens, start, attend, args.repeats)
        row["stored_fraction"] = float(jnp.mean(state.length)) / args.context  # the chunks end at the context
        log(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}))
        result["chunks"][name] = row
        write_result(args.out, result)  # after each cache: a cut run keeps what it measured
        del state
    dual, skip = result["chunks"]["dual"], result["chunks"]["no_attention"]
    result["dual_extra_wall_ms"] = dual["wall_ms"] - skip["wall_ms"]
    result["dual_extra_busy_ms"] = dual["busy_ms_per_step"] - skip["busy_ms_per_step"]
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
