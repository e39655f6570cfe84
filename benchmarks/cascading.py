"""Per-step cost of the Cascading KV cache vs a concatenation-based sink cache (one layer, one token).

    python benchmarks/cascading.py --sizes 256 1024 2048 --reps 50 --out results/cascading_cpu.json   # CPU
    python benchmarks/cascading.py --out results/cascading_h100.json                                  # GPU

The Cascading paper (arXiv 2406.17808 v1) reports 1.33 -> 0.54 ms "per caching operation" for its
circular-buffer cache over a previous, concatenation-based implementation. Two operations are
timed here, both jit-compiled with the cache donated, warmed up, median of --reps calls with
`block_until_ready`, at Llama-3.1-8B attention shapes (K = 8 KV heads, G = 4, E = 128, B = 1):

  update   the caching operation alone.
           sink:      HF's old `SinkCache` in steady state: concatenate the new key/value, keep the
                      S sinks and the last M - S tokens (slice + concatenate), re-rotate the kept
                      window keys back by one position (post-RoPE keys, as HF stored them).
           cascading: `cascading.push` of one token into full cascades (circular buffers, pointer
                      moves, C slot writes per head), score given.
  step     a full decode step of one layer: attention of the 32 query heads over the cache plus
           the update. sink: update, then attention over the M slots. cascading: `CascadeAttend`
           (re-rotation of every stored key at its in-cache position, attention, EMA, push).

Both caches hold M = --sizes slots (cascading: S + C * W <= M via `CascadeConfig.for_budget`).
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

import jax
import jax.numpy as jnp

from wgkv_jax.attention.blocked import grouped_attention
from wgkv_jax.cache.cascading import CascadeAttend, CascadeConfig, CascadingCache, push
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import apply_rope, rope_inv_freq

LLAMA31_8B_ATTN = ModelConfig(
    arch="llama", vocab_size=128, d_model=4096, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=128,
    ffn_dim=128, rope_theta=500000.0, max_seq_len=1 << 20,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="cache slots M")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on GPU")
    p.add_argument("--cascades", type=int, default=4)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- sink cache baseline


def sink_update(k_bkme, v_bkme, k_new_bke, v_new_bke, sinks: int, inv_freq):
    """HF `SinkCache.update` in steady state (the cache already holds M tokens, keys post-RoPE):
    concatenate, then keep sinks + the newest M - S tokens, rotating the kept window back by one."""
    k_cat = jnp.concatenate([k_bkme, k_new_bke[:, :, None]], axis=2)
    v_cat = jnp.concatenate([v_bkme, v_new_bke[:, :, None]], axis=2)
    window = k_cat[:, :, sinks + 1 :]
    shift = jnp.full(window.shape[:2], -1, jnp.int32)  # one position back: rotations compose
    window = apply_rope(window, shift, inv_freq)  # [B, K, M - S, E] as [B, T=K, ..., E]
    k_out = jnp.concatenate([k_cat[:, :, :sinks], window], axis=2)
    v_out = jnp.concatenate([v_cat[:, :, :sinks], v_cat[:, :, sinks + 1 :]], axis=2)
    return k_out, v_out


def sink_step(k_bkme, v_bkme, q_bkge, k_new_bke, v_new_bke, sinks: int, inv_freq):
    """One decode step of a sink cache: update, then attention over all M slots."""
    k_bkme, v_bkme = sink_update(k_bkme, v_bkme, k_new_bke, v_new_bke, sinks, inv_freq)
    mask_bts = jnp.ones((k_bkme.shape[0], 1, k_bkme.shape[2]), bool)
    out = grouped_attention(q_bkge[:, None], k_bkme, v_bkme, mask_bts)
    return out, k_bkme, v_bkme


# ----------------------------------------------------------------------------- timing


def median_ms(fn, state, args, reps: int, warmup: int) -> tuple[float, object]:
    """Median wall time (ms) of state = fn(state, *args)[-1] with the state donated each call."""
    for _ in range(warmup):
        state = fn(state, *args)
        jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state = fn(state, *args)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), state


def full_cascade(cfg: ModelConfig, ccfg: CascadeConfig, dtype, key) -> CascadingCache:
    """A cache in steady state: every slot filled, pointers mid-way, a long stream already seen."""
    cache = CascadingCache.zeros(cfg, 1, ccfg, dtype)
    n, w = ccfg.capacity, ccfg.window
    k1, k2, k3 = jax.random.split(key, 3)
    return CascadingCache(
        k=jax.random.normal(k1, cache.k.shape, dtype),
        v=jax.random.normal(k2, cache.v.shape, dtype),
        pos=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), cache.pos.shape),
        score=jax.random.uniform(k3, cache.score.shape, jnp.float32) * 1e-3,
        start=jnp.full(cache.start.shape, w // 2, jnp.int32),
        fill=jnp.full(cache.fill.shape, w, jnp.int32),
        seen=jnp.full(cache.seen.shape, ccfg.sinks + 10 * ccfg.span + 1, jnp.int32),
    )


def bench_size(size: int, args, dtype) -> dict:
    cfg = LLAMA31_8B_ATTN
    ccfg = CascadeConfig.for_budget(size, cascades=args.cascades, sinks=args.sinks)
    b, k, g, e = 1, cfg.n_kv_heads, cfg.group_size, cfg.head_dim
    key = jax.random.PRNGKey(size)
    kq, kk, kv, kc, ks = jax.random.split(key, 5)
    q_bkge = jax.random.normal(kq, (b, k, g, e), dtype)
    k_bke = jax.random.normal(kk, (b, k, e), dtype)
    v_bke = jax.random.normal(kv, (b, k, e), dtype)
    inv = rope_inv_freq(cfg)
    row = {"size": size, "cascade": dataclasses_dict(ccfg)}

    sink_up = jax.jit(lambda st, kn, vn: sink_update(*st, kn, vn, args.sinks, inv), donate_argnums=0)
    sink_st = jax.jit(lambda st, q, kn, vn: sink_step(*st, q, kn, vn, args.sinks, inv)[1:], donate_argnums=0)
    kv_shape = (b, k, size, e)
    sink_state = (jax.random.normal(kc, kv_shape, dtype), jax.random.normal(ks, kv_shape, dtype))
    row["sink_update_ms"], sink_state = median_ms(sink_up, sink_state, (k_bke, v_bke), args.reps, args.warmup)
    row["sink_step_ms"], sink_state = median_ms(sink_st, sink_state, (q_bkge, k_bke, v_bke), args.reps, args.warmup)
    del sink_state

    cache = full_cascade(cfg, ccfg, dtype, kc)
    score_b1k = jnp.full((b, 1, k), 5e-4, jnp.float32)
    pos_b1 = jnp.full((b, 1), 10 * ccfg.span, jnp.int32)

    def cas_update(view, kn, vn):
        return push(view, kn[:, None], vn[:, None], score_b1k, pos_b1, ccfg)

    cas_update = jax.jit(cas_update, donate_argnums=0)
    attend = CascadeAttend(ccfg, cfg)

    def cas_step_fn(cache, q, kn, vn):
        qr = apply_rope(q[:, None], pos_b1, inv)
        kr = apply_rope(kn[:, None], pos_b1, inv)
        return attend(cache, jnp.int32(0), None, qr, kn[:, None], kr, vn[:, None], pos_b1)[1]

    cas_step = jax.jit(cas_step_fn, donate_argnums=0)
    view = cache.layer(0)
    row["cascade_update_ms"], view = median_ms(cas_update, view, (k_bke, v_bke), args.reps, args.warmup)
    del view
    row["cascade_step_ms"], cache = median_ms(cas_step, cache, (q_bkge, k_bke, v_bke), args.reps, args.warmup)
    row["cascade_kv_bytes"] = cache.kv_nbytes
    row["sink_kv_bytes"] = 2 * b * k * size * e * jnp.dtype(dtype).itemsize
    return row


def dataclasses_dict(ccfg: CascadeConfig) -> dict:
    return {"window": ccfg.window, "cascades": ccfg.cascades, "sinks": ccfg.sinks, "capacity": ccfg.capacity}


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = jax.devices()[0]
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if dev.platform == "cpu" else "bfloat16")
    dtype = jnp.dtype(dtype_name)
    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        rows.append(bench_size(size, args, dtype))
        print(f"[size {size}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    cfg = LLAMA31_8B_ATTN
    result = {
        "benchmark": "cascading_vs_sink_cache",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": dev.device_kind,
        "platform": dev.platform,
        "host": platform.node(),
        "jax": jax.__version__,
        "dtype": dtype_name,
        "shapes": {"batch": 1, "kv_heads": cfg.n_kv_heads, "q_heads": cfg.n_heads, "head_dim": cfg.head_dim},
        "reps": args.reps,
        "warmup": args.warmup,
        "paper_reference_ms": {"previous": 1.33, "cascading": 0.54},
        "rows": rows,
    }
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}, {dtype_name}, B=1 K=8 G=4 E=128, median ms")
    head = f"{'slots':>7} {'C x W + S':>12} {'sink upd':>9} {'casc upd':>9} {'ratio':>6} {'sink step':>10} "
    print(head + f"{'casc step':>10} {'ratio':>6}")
    for r in rows:
        c = r["cascade"]
        shape = f"{c['cascades']}x{c['window']}+{c['sinks']}"
        print(
            f"{r['size']:>7} {shape:>12} {r['sink_update_ms']:>9.3f} "
            f"{r['cascade_update_ms']:>9.3f} {r['cascade_update_ms'] / r['sink_update_ms']:>6.2f} "
            f"{r['sink_step_ms']:>10.3f} {r['cascade_step_ms']:>10.3f} {r['cascade_step_ms'] / r['sink_step_ms']:>6.2f}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
