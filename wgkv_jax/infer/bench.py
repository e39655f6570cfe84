"""Long-context speed and memory of the dual cache vs a full cache, on a Llama-3.1-8B-shaped stack.

Random bf16 weights (no download), random admission at `rate` beyond the window (as the original
profiling does). Everything that is compared runs side by side in one process:

  attention-only, one layer
    prefill  full: cuDNN causal flash attention over T tokens
             dual: the ragged kernel over every prefill chunk (ring + the global store as it
                   grows chunk by chunk), i.e. exactly the attention work of a chunked prefill
    decode   full: XLA masked attention and the Pallas kernel over T cached tokens
             dual: the Pallas kernel over the ring + ~rate * T global entries per head
  end to end (32 layers, batch 1)
    prefill  full: one call, cuDNN attention; dual: chunked prefill through `DualAttend`
    decode   ms per token of the on-device decode loop, both caches
  batch     the largest batch whose cache fits next to the weights, for each cache, and the decode
            tokens/s at that batch (caches filled with random K/V of the right lengths)

Bytes: decode GB/s counts the K/V bytes each step must read (full: all T tokens; dual: the
window + the stored global entries); the floor is (weight bytes + those bytes) / HBM peak.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.models import LLAMA31_8B
from wgkv_jax.attention.blocked import blocked_causal_attention, grouped_attention
from wgkv_jax.cache.admission import FixedAdmission
from wgkv_jax.cache.dual import CacheConfig, DualAttend, DualCache
from wgkv_jax.cache.full import FullAttend, KVCache
from wgkv_jax.infer import generate as gen
from wgkv_jax.infer.sampling import SamplingConfig
from wgkv_jax.kernels import dispatch, ragged
from wgkv_jax.model.config import ModelConfig
from wgkv_jax.model.transformer import param_shapes, unstack_layers

GREEDY = SamplingConfig(temperature=0.0)


TILINGS = (  # prefill tile candidates measured at the first context (pure Pallas path)
    ragged.Tiling(block_m=64, block_k=64, num_warps=4, num_stages=2),
    ragged.Tiling(block_m=128, block_k=64, num_warps=8, num_stages=3),
    ragged.Tiling(block_m=128, block_k=32, num_warps=4, num_stages=3),
    ragged.Tiling(block_m=64, block_k=64, num_warps=4, num_stages=3),
)


def _ragged() -> str:
    return dispatch.ragged_impl("pallas")  # "interpret" on CPU (smoke runs)


def dual_prefill_impl() -> str:
    """The dual cache's prefill attention: what "auto" picks on a GPU (the cuDNN split), else the CPU kernel."""
    return dispatch.ragged_impl("auto") if _ragged() == "pallas" else _ragged()


def _causal(cfg) -> str:
    return dispatch.causal_impl("cudnn", jnp.bfloat16, cfg.head_dim)  # reference (warned) off GPU


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_result(path, result: dict) -> None:
    """Write a benchmark's JSON (parent folders made) and say where."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log(f"wrote {path}")


def timing(fn, *args, repeats: int = 5, warmup: int = 1) -> dict:
    """Wall times of fn(*args), results blocked on: the first call in s (compile included), then
    the median and the minimum in ms of `repeats` calls after `warmup` more."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "first_call_s": first}


def timed(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in ms of fn(*args) after `warmup` (at least one) untimed calls."""
    return timing(fn, *args, repeats=repeats, warmup=max(warmup - 1, 0))["ms"]


def random_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16):
    """Random weights made on the device leaf by leaf (normal * 0.02, norms ~1)."""
    flat, treedef = jax.tree.flatten_with_path(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    leaves = []
    for i, (path, shape) in enumerate(flat):
        key = jax.random.PRNGKey(seed * 1000 + i)
        base, std = (1.0, 0.1) if path[-1].key.endswith("norm") else (0.0, 0.02)
        make = jax.jit(lambda k, shape=shape, base=base, std=std: base + std * jax.random.normal(k, shape, dtype))
        leaves.append(make(key))
    return jax.tree.unflatten(treedef, leaves)


LAYERS = ("fused", "unrolled", "scanned")


def model_params(cfg: ModelConfig, layers: str = "fused", seed: int = 0):
    """Random weights in one of the layouts `hidden_states` runs (as `infer.generate --layers`):
    "scanned" (stacked [L, ...] arrays, one `lax.scan`), "unrolled" (one buffer per layer) or
    "fused" (unrolled, q/k/v and gate/up each one matmul). On GPU the scan copies each layer's
    weight slice before its matmuls, every call: ~0.9 GB of traffic per layer of an 8B model,
    which a chunked prefill pays once per chunk. One copy of the weights is kept."""
    if layers not in LAYERS:
        raise ValueError(f"layers={layers!r}: expected one of {LAYERS}")
    params = random_params(cfg, seed)
    return params if layers == "scanned" else unstack_layers(params, fuse=layers == "fused")


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- synthetic caches


def _sorted_admitted(rng, n_tokens: int, rate: float, shape) -> list[np.ndarray]:
    """Per head, the sorted positions a random admission at `rate` keeps among [0, n_tokens)."""
    return [np.flatnonzero(rng.random(n_tokens) < rate) for _ in range(int(np.prod(shape)))]


def synthetic_dual(cfg, batch, n_tokens, setting, rate, seed=0, dtype=jnp.bfloat16):
    """A DualCache as a chunked prefill of n_tokens with random admission leaves it (random K/V)."""
    w, chunk = setting.window, setting.chunk
    cap = setting.resolve_capacity(n_tokens)
    rng = np.random.default_rng(seed)
    lbk = (cfg.n_layers, batch, cfg.n_kv_heads)
    pos = np.full((*lbk, cap), -1, np.int32)
    length = np.zeros(lbk, np.int32)
    for i, p in enumerate(_sorted_admitted(rng, max(n_tokens - w, 0), rate, lbk)):
        p = p[:cap]
        pos.reshape(-1, cap)[i, : len(p)] = p
        length.reshape(-1)[i] = len(p)
    cache = DualCache.zeros(cfg, batch, w, cap, dtype, chunk=chunk)
    key = jax.random.PRNGKey(seed)
    fill = _fill_random
    return dataclasses.replace(
        cache,
        ring_k=fill(jax.random.fold_in(key, 1), cache.ring_k),
        ring_v=fill(jax.random.fold_in(key, 2), cache.ring_v),
        glob_k=fill(jax.random.fold_in(key, 3), cache.glob_k),
        glob_v=fill(jax.random.fold_in(key, 4), cache.glob_v),
        glob_pos=jnp.asarray(pos),
        length=jnp.asarray(length),
        ring_admit=jnp.asarray(rng.random(cache.ring_admit.shape) < rate),
    )


def synthetic_full(cfg, batch, size, seed=0, dtype=jnp.bfloat16):
    cache = KVCache.zeros(cfg, batch, size, dtype)
    key = jax.random.PRNGKey(seed)
    return KVCache(_fill_random(jax.random.fold_in(key, 1), cache.k), _fill_random(jax.random.fold_in(key, 2), cache.v))


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _fill_layer(x, key, layer):
    return x.at[layer].set(jax.random.normal(key, x.shape[1:], x.dtype))


def _fill_random(key, x):
    """Random normal values written into x one layer at a time (donated: no second cache in memory,
    and the random bits of one layer at a time)."""
    for layer in range(x.shape[0]):
        x = _fill_layer(x, jax.random.fold_in(key, layer), layer)
    return x


# ----------------------------------------------------------------------------- attention only


def attention_prefill(cfg, n_tokens, setting, rate, repeats, tilings=()) -> dict:
    """One layer's prefill attention: cuDNN full causal vs the ragged kernel over all chunks."""
    k_heads, g, e, w, chunk = cfg.n_kv_heads, cfg.group_size, cfg.head_dim, setting.window, setting.chunk
    key = jax.random.PRNGKey(0)
    q = jax.random.normal(key, (1, n_tokens, k_heads * g, e), jnp.bfloat16)
    kv = jax.random.normal(jax.random.fold_in(key, 1), (2, 1, n_tokens, k_heads, e), jnp.bfloat16)
    if _causal(cfg) == "cudnn":
        causal = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
    else:  # CPU smoke runs: the blocked XLA path
        pos = jnp.arange(n_tokens)[None]
        causal = lambda q, k, v: blocked_causal_attention(q.reshape(*q.shape[:2], k_heads, g, e), k, v, pos)  # noqa: E731
    full_ms = timed(jax.jit(causal), q, kv[0], kv[1], repeats=repeats)

    one = dataclasses.replace(cfg, n_layers=1)
    cache = synthetic_dual(one, 1, n_tokens, setting, rate)
    starts = np.arange(0, n_tokens, chunk)
    gpos = np.asarray(cache.glob_pos[0, 0])  # [K, C], -1 past each head's length
    gpos = np.where(gpos < 0, 2**31 - 1, gpos)
    lens = np.stack([[np.searchsorted(p, c0 - w + chunk) for p in gpos] for c0 in starts])  # after promotion
    opens = np.stack([[np.searchsorted(p, c0 - w) for p in gpos] for c0 in starts])  # stored before the chunk
    q_chunk = jax.random.normal(key, (1, chunk, k_heads, g, e), jnp.bfloat16)

    def dual(impl, tiling=None):
        @jax.jit
        def run(cache, q_chunk, lens, opens, starts):
            def body(acc, xs):
                glen, n_open, c0 = xs
                pos = (c0 + jnp.arange(chunk))[None]
                if tiling is None:
                    o = ragged.attend_grouped(
                        q_chunk, pos, cache.ring_k, cache.ring_v, cache.glob_k, cache.glob_v, cache.glob_pos,
                        glen[None], 0, window=w, glob_lo=w, impl=impl, open_len_bk=n_open[None],
                        out_dtype=jnp.bfloat16,
                    )  # fmt: skip
                else:
                    o = ragged.ragged_attention(
                        jnp.swapaxes(q_chunk, 1, 2).reshape(1, k_heads, chunk * g, e), jnp.repeat(pos, g, axis=1),
                        cache.ring_k, cache.ring_v, pos[:, -1] + 1, cache.glob_k, cache.glob_v, cache.glob_pos,
                        glen[None], 0, window=w, glob_lo=w, tiling=tiling, open_len_bk=n_open[None],
                    )  # fmt: skip
                return None, o.astype(jnp.bfloat16)  # every chunk's output is kept, as a model would

            xs = (jnp.asarray(lens, jnp.int32), jnp.asarray(opens, jnp.int32), jnp.asarray(starts, jnp.int32))
            return jax.lax.scan(body, None, xs)[1]

        return timed(run, cache, q_chunk, lens, opens, starts, repeats=repeats)

    out = {"full_cudnn_ms": full_ms, "full_tflops": 4 * n_tokens * n_tokens / 2 * k_heads * g * e / full_ms / 1e9}
    out["dual_pallas_ms"] = dual(_ragged())
    if _ragged() == "pallas":
        out["dual_cudnn_split_ms"] = dual("cudnn")
    out["dual_kernel_ms"] = min(out["dual_pallas_ms"], out.get("dual_cudnn_split_ms", np.inf))
    out["speedup"] = full_ms / out["dual_kernel_ms"]
    out["mean_global_len"] = float(lens[-1].mean())
    if tilings:
        out["pallas_tilings"] = {
            f"m{t.block_m}_k{t.block_k}_w{t.num_warps}_s{t.num_stages}": dual(None, t) for t in tilings
        }
    return out


DECODE_TILINGS = tuple(  # decode tile candidates swept at the first context (B * K = 8 heads at batch 1)
    ragged.Tiling(block_m=16, block_k=bk, splits=sp, num_warps=wp, num_stages=st)
    for bk, sp, wp, st in (
        (64, 8, 4, 3), (64, 16, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 16, 4, 3), (128, 32, 8, 3),
        (128, 64, 4, 2), (32, 32, 4, 4), (32, 64, 4, 4),
    )
)  # fmt: skip


def tiling_name(t: ragged.Tiling) -> str:
    return f"m{t.block_m}_k{t.block_k}_s{t.splits}_w{t.num_warps}_st{t.num_stages}"


def attention_decode(cfg, n_tokens, setting, rate, repeats, batch=1, tilings=(), traced: bool = False) -> dict:
    """Decode attention (one new token per row) over each cache, per layer: the mean over a scan
    of all L layers of L-layer caches (so per-call dispatch is amortised and every layer reads its
    own data). The XLA baseline reads its layer through a dynamic slice, as a scanned model does.
    The dual cache is read as a decode step reads it (every stored entry is older than the
    window); `dual_empty_ms` is the same call on an empty global store (the fixed cost). With
    `traced` (Pallas on GPU), `trace` holds `per_layer_kernels` of the full, dual and empty calls."""
    k_heads, g, e, w, n_layers = cfg.n_kv_heads, cfg.group_size, cfg.head_dim, setting.window, cfg.n_layers
    q = jax.random.normal(jax.random.PRNGKey(3), (batch, 1, k_heads, g, e), jnp.bfloat16)
    pos = jnp.full((batch, 1), n_tokens, jnp.int32)
    length = jnp.full((batch, k_heads), n_tokens + 1, jnp.int32)

    def full_xla(q, cache, layer):
        mask = jnp.arange(cache.size)[None, None, :] <= pos[:, :, None]
        return grouped_attention(q, cache.k[layer], cache.v[layer], mask)

    def full_pallas(q, cache, layer, tiling=None):
        args = (q, pos, None, None, cache.k, cache.v, None, length, layer)
        return ragged.attend_grouped(*args, window=0, glob_lo=0, impl=_ragged(), tiling=tiling)

    def dual_pallas(q, cache, layer, tiling=None):
        n = cache.length  # stacked [L, B, K], read at `layer` by the kernel, as a decode step passes it
        return ragged.attend_grouped(
            q, pos, cache.ring_k, cache.ring_v, cache.glob_k, cache.glob_v, cache.glob_pos, n,
            layer, window=w, glob_lo=w, impl=_ragged(), open_len_bk=n, tiling=tiling,
        )  # fmt: skip

    def per_layer(fn, cache, unroll=False):
        return per_layer_ms(fn, q, cache, n_layers, repeats, unroll)

    per_token = 2 * e * 2  # K and V bytes of one token, one head, one layer, bf16
    out, trace = {}, {}
    traced = traced and _ragged() == "pallas"  # the GPU kernel (a trace has no device kernels on CPU)
    full = synthetic_full(cfg, batch, gen.cache_bucket(n_tokens + 1))
    full_bytes = batch * k_heads * (n_tokens + 1) * per_token
    for name, fn in (("full_xla", full_xla), ("full_pallas", full_pallas)):
        out[f"{name}_ms"] = ms = per_layer(fn, full)
        out[f"{name}_gbps"] = full_bytes / ms / 1e6
        out[f"{name}_unrolled_ms"] = per_layer(fn, full, unroll=True)
    if traced:
        trace["full_pallas"] = per_layer_kernels(full_pallas, q, full, n_layers)
    if tilings:
        out["full_pallas_tilings"] = {
            tiling_name(t): per_layer(functools.partial(full_pallas, tiling=t), full) for t in tilings
        }
        out["full_pallas_best_ms"] = min(out["full_pallas_tilings"].values())
    del full
    dual = synthetic_dual(cfg, batch, n_tokens, setting, rate)
    dual_bytes = (int(jnp.sum(dual.length)) // n_layers + batch * k_heads * w) * per_token
    out["dual_pallas_ms"] = ms = per_layer(dual_pallas, dual)
    out["dual_pallas_gbps"] = dual_bytes / ms / 1e6
    out["dual_pallas_unrolled_ms"] = per_layer(dual_pallas, dual, unroll=True)
    if traced:
        trace["dual_pallas"] = per_layer_kernels(dual_pallas, q, dual, n_layers)
    if tilings:
        out["dual_pallas_tilings"] = {
            tiling_name(t): per_layer(functools.partial(dual_pallas, tiling=t), dual) for t in tilings
        }
        out["dual_pallas_best_ms"] = min(out["dual_pallas_tilings"].values())
    empty = dataclasses.replace(dual, length=jnp.zeros_like(dual.length))
    out["dual_empty_ms"] = per_layer(dual_pallas, empty)
    out["dual_empty_unrolled_ms"] = per_layer(dual_pallas, empty, unroll=True)
    if traced:
        trace["dual_empty"] = per_layer_kernels(dual_pallas, q, empty, n_layers)
    out["full_bytes"], out["dual_bytes"] = full_bytes, dual_bytes
    best_full = min(out["full_xla_ms"], out["full_pallas_ms"], out.get("full_pallas_best_ms", np.inf))
    best_dual = min(out["dual_pallas_ms"], out.get("dual_pallas_best_ms", np.inf))
    out["speedup_vs_best_full"] = best_full / best_dual
    out["best_full_gbps"], out["best_dual_gbps"] = full_bytes / best_full / 1e6, dual_bytes / best_dual / 1e6
    # the same calls with static layer indices (one program of L layers, as the unrolled decode step)
    best_full_u = min(out["full_xla_unrolled_ms"], out["full_pallas_unrolled_ms"])
    out["speedup_vs_best_full_unrolled"] = best_full_u / out["dual_pallas_unrolled_ms"]
    if traced:  # kernel time alone, from a device trace of the unrolled calls
        out["trace"] = trace
        out["speedup_kernel_only"] = trace["full_pallas"]["kernel_ms"] / trace["dual_pallas"]["kernel_ms"]
        # device time per call: the traced program's span (first kernel start to last kernel end) per
        # layer, i.e. every kernel of the calls and the gaps between them, without the program's own
        # dispatch and sync (paid once per decode step, whatever the step holds)
        out["speedup_device_time"] = trace["full_pallas"]["span_ms"] / trace["dual_pallas"]["span_ms"]
    return out


def _all_layers(fn, n_layers: int, unroll: bool):
    @jax.jit
    def run(q, cache):
        if unroll:
            return sum(fn(q, cache, layer).reshape(-1)[0] for layer in range(n_layers))

        def body(acc, layer):
            return acc + fn(q, cache, layer).reshape(-1)[0], None

        return jax.lax.scan(body, jnp.float32(0), jnp.arange(n_layers))[0]

    return run


def per_layer_ms(fn, q, cache, n_layers: int, repeats: int, unroll: bool = False) -> float:
    """Mean ms per layer of fn(q, cache, layer) over all `n_layers` layers of the cache (per-call
    dispatch amortised, every layer reads its own data): a scan (one compiled layer, a traced layer
    index), or with `unroll` a Python loop in one program (static layer indices, as the decode step
    of `layers="unrolled"` runs them)."""
    return timed(_all_layers(fn, n_layers, unroll), q, cache, repeats=repeats) / n_layers


def per_layer_kernels(fn, q, cache, n_layers: int) -> dict:
    """`kernel_time` per layer of the unrolled program of `per_layer_ms`, from a device trace: how
    much of a call is the attention kernel itself, the other kernels (merge, padding) and idle."""
    run = _all_layers(fn, n_layers, unroll=True)
    jax.block_until_ready(run(q, cache))
    return kernel_time(trace_kernels(run, q, cache)[0], n_layers, "wgkv_ragged_attention")


def check_kernel(cfg, n_tokens, setting, rate) -> dict:
    """GPU kernel vs the float32 reference, bf16 inputs: relative error of a decode step and a chunk."""
    one = dataclasses.replace(cfg, n_layers=1)
    dual = synthetic_dual(one, 2, n_tokens, setting, rate, seed=7)
    res = {}
    for t in (1, setting.chunk):
        q = jax.random.normal(jax.random.PRNGKey(t), (2, t, cfg.n_kv_heads, cfg.group_size, cfg.head_dim), jnp.bfloat16)
        pos = jnp.broadcast_to(n_tokens - t + jnp.arange(t)[None], (2, t))
        args = (q, pos, dual.ring_k, dual.ring_v, dual.glob_k, dual.glob_v, dual.glob_pos, dual.length[0], 0)
        out = ragged.attend_grouped(*args, window=setting.window, glob_lo=setting.window, impl=_ragged())
        ref = ragged.attend_grouped(*args, window=setting.window, glob_lo=setting.window, impl="reference")
        res[f"rel_err_t{t}"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        if t == 1:  # as a decode step calls it: the stacked lengths, read by the kernel at its layer
            kw = dict(window=setting.window, glob_lo=setting.window, impl=_ragged(), open_len_bk=dual.length)
            out = ragged.attend_grouped(*args[:7], dual.length, 0, **kw)
            res["rel_err_t1_stacked"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        else:  # as a prefill chunk calls it: the slots stored before the chunk through cuDNN, folded in
            cap = dual.glob_k.shape[3]
            before = dual.glob_pos[0] <= n_tokens - t - setting.window
            open_len = jnp.sum((jnp.arange(cap) < dual.length[0][..., None]) & before, axis=-1)
            split = "cudnn" if _ragged() == "pallas" else "interpret-xla"
            kw = dict(window=setting.window, glob_lo=setting.window, impl=split, open_len_bk=open_len)
            out = ragged.attend_grouped(*args, **kw)
            res[f"rel_err_t{t}_cudnn_split"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    return res


# ----------------------------------------------------------------------------- device traces


def device_events(trace: dict) -> tuple[list[tuple[float, float, str]], dict]:
    """(start us, duration us, name) of the kernels on the device streams of a Chrome-format trace,
    and the event count of every (process, thread) of the trace (which ones were read is in the
    names). Device processes are those named "/device:...";
    their "Stream ..." threads hold the kernels (derived lines such as "XLA Ops" are left out)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    device = {pid for pid, name in procs.items() if name.startswith("/device:")}
    streams = {key for key, name in threads.items() if key[0] in device and name.startswith("Stream")}
    out = [
        (float(e["ts"]), float(e.get("dur", 0.0)), e["name"])
        for e in events
        if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams
    ]
    seen = collections.Counter(
        f"{procs.get(e['pid'], e['pid'])} | {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
        for e in events
        if e.get("ph") == "X"
    )
    return sorted(out), dict(seen.most_common(30))


def busy_time(events: list[tuple[float, float, str]]) -> tuple[float, float]:
    """(busy, span) in us: the union of the event intervals, and first start to last end."""
    if not events:
        return 0.0, 0.0
    busy, cur_start, cur_end = 0.0, events[0][0], events[0][0] + events[0][1]
    last = cur_end
    for start, dur, _ in events[1:]:
        end = start + dur
        last = max(last, end)
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return busy, last - events[0][0]


def kernel_summary(events, steps: int, top: int = 15) -> dict:
    """Per decode step: busy and span ms, gaps, kernels launched; the top kernels by total time
    (digits in names folded, so one fusion per layer counts as one kind)."""
    busy, span = busy_time(events)
    total, count = collections.Counter(), collections.Counter()
    for _, dur, name in events:
        kind = re.sub(r"\d+", "#", name)[:120]
        total[kind] += dur
        count[kind] += 1
    return {
        "busy_ms_per_step": busy / steps / 1e3,
        "span_ms_per_step": span / steps / 1e3,
        "gap_ms_per_step": (span - busy) / steps / 1e3,
        "busy_fraction": busy / span if span else 0.0,
        "kernels_per_step": len(events) / steps,
        "top_kernels": [
            {"kernel": kind, "ms_per_step": us / steps / 1e3, "per_step": count[kind] / steps}
            for kind, us in total.most_common(top)
        ],
    }


def trace_kernels(fn, *args) -> tuple[list[tuple[float, float, str]], object]:
    """The device kernels (start us, duration us, name) of one call of fn(*args) under
    `jax.profiler`, and the call's result (blocked on). Call fn once before, so that no
    compilation lands in the trace."""
    import glob
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        out = jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {tmp}")
        with gzip.open(files[0]) as f:
            return device_events(json.load(f))[0], out


def kernel_time(events, n: int, pattern: str) -> dict:
    """Per unit of n (layers, steps): device busy ms, the ms of the kernels whose name contains
    `pattern`, and the number of kernels launched."""
    busy, span = busy_time(events)
    mine = sum(dur for _, dur, name in events if pattern in name)
    return {"busy_ms": busy / n / 1e3, "span_ms": span / n / 1e3, "kernel_ms": mine / n / 1e3,
            "kernels": len(events) / n}  # fmt: skip


# ----------------------------------------------------------------------------- end to end


def _decode_ms(params, cfg, cache, n_tokens, attend, steps: int) -> tuple[float, object]:
    b = cache.k.shape[1] if isinstance(cache, KVCache) else cache.glob_k.shape[1]
    first = jnp.zeros((b,), jnp.int32)
    lengths = jnp.full((b,), n_tokens, jnp.int32)
    key = jax.random.PRNGKey(0)
    # warm-up on a copy-free path: a 2-step loop compiles the same program (n_new is traced)
    toks, cache = gen.decode_loop(params, cfg, cache, first, lengths, key, GREEDY, steps, (), jnp.int32(2), attend)
    toks.block_until_ready()
    t0 = time.perf_counter()
    toks, cache = gen.decode_loop(params, cfg, cache, first, lengths, key, GREEDY, steps, (), jnp.int32(steps), attend)
    toks.block_until_ready()
    return (time.perf_counter() - t0) * 1e3 / (steps - 1), cache


@dataclasses.dataclass(frozen=True)
class NoAttention:
    """An `Attend` that skips attention and leaves the cache alone: the decode step's other work."""

    def __call__(self, cache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        return jnp.zeros_like(q_btkgd), cache


def _step_ms(params, cfg, cache, n_tokens, attend, steps: int) -> tuple[float, object]:
    """ms per decode step of the jitted single step (donated cache, updated in place), host loop."""
    b = cache.k.shape[1] if isinstance(cache, KVCache) else cache.glob_k.shape[1]
    tok = jnp.zeros((b,), jnp.int32)
    key = jax.random.PRNGKey(0)
    for i in range(steps + 2):
        if i == 2:
            tok.block_until_ready()
            t0 = time.perf_counter()
        pos = jnp.full((b,), n_tokens + i, jnp.int32)
        tok, cache = gen.decode_step(params, cfg, cache, tok, pos, key, GREEDY, attend)
    tok.block_until_ready()
    return (time.perf_counter() - t0) * 1e3 / steps, cache


def end_to_end(params, cfg, n_tokens, setting, rate, steps) -> dict:
    """Batch-1 prefill of n_tokens then `steps` decode tokens, full cache vs dual cache, all on the
    same weights (`model_params`: the layout is the caller's choice, as in `infer.generate`)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, n_tokens)).astype(np.int32)
    out = {}
    # full cache: single-call prefill with cuDNN attention
    size = gen.cache_bucket(n_tokens + steps)
    state = KVCache.zeros(cfg, 1, size, jnp.bfloat16)
    out["full_kv_bytes"] = state.nbytes
    lengths = jnp.asarray([n_tokens], jnp.int32)
    prefill = functools.partial(gen.prefill, attend=FullAttend("prefill", _causal(cfg)))
    key = jax.random.PRNGKey(0)
    first, state = prefill(params, cfg, state, tokens, lengths, key, GREEDY)  # compile + warm
    first.block_until_ready()
    t0 = time.perf_counter()
    first, state = prefill(params, cfg, state, tokens, lengths, key, GREEDY)
    first.block_until_ready()
    out["full_prefill_s"] = time.perf_counter() - t0
    # the same prefill with attention skipped: the work no attention kernel can remove, which bounds
    # any end-to-end prefill speedup (Amdahl) at full_prefill_s / no_attention_prefill_s
    skip = functools.partial(gen.prefill, attend=NoAttention())
    for _ in range(2):  # compile, then timed
        t0 = time.perf_counter()
        first, state = skip(params, cfg, state, tokens, lengths, key, GREEDY)
        first.block_until_ready()
    out["no_attention_prefill_s"] = time.perf_counter() - t0
    out["full_decode_ms"], state = _decode_ms(params, cfg, state, n_tokens, FullAttend("decode", _ragged()), steps)
    out["no_attention_decode_ms"], state = _decode_ms(params, cfg, state, n_tokens, NoAttention(), steps)
    del state

    # dual cache: chunked prefill, random admission
    cap = setting.resolve_capacity(n_tokens + steps)
    adm = FixedAdmission("random", rate=rate, seed=0)
    attend = DualAttend(adm, impl=dual_prefill_impl())
    chunk = setting.chunk
    make = lambda: DualCache.zeros(cfg, 1, setting.window, cap, jnp.bfloat16, chunk=chunk)  # noqa: E731
    pos = np.arange(n_tokens, dtype=np.int32)[None]
    for phase in ("warm", "timed"):
        state = make()
        if phase == "warm":  # compile with one chunk
            first, state = gen.prefill_chunk(params, cfg, state, tokens[:, :chunk], pos[:, :chunk], key, GREEDY, attend)
            first.block_until_ready()
            continue
        t0 = time.perf_counter()
        for c in range(0, n_tokens, chunk):
            first, state = gen.prefill_chunk(
                params, cfg, state, tokens[:, c : c + chunk], pos[:, c : c + chunk], key, GREEDY, attend
            )
        first.block_until_ready()
        out["dual_prefill_s"] = time.perf_counter() - t0
    out["dual_kv_bytes"] = state.kv_nbytes
    out["dual_cache_bytes"] = state.nbytes
    out["dual_stored_fraction"] = float(jnp.mean(state.length)) / n_tokens
    out["dual_evicted"] = int(jnp.sum(state.evicted))
    decode = dataclasses.replace(attend, batched_promotion=True)
    out["dual_decode_ms"], state = _decode_ms(params, cfg, state, n_tokens, decode, steps)
    del state
    out["prefill_speedup"] = out["full_prefill_s"] / out["dual_prefill_s"]
    out["prefill_speedup_bound"] = out["full_prefill_s"] / out["no_attention_prefill_s"]
    out["decode_speedup"] = out["full_decode_ms"] / out["dual_decode_ms"]
    out["kv_memory_reduction"] = 1 - out["dual_kv_bytes"] / out["full_kv_bytes"]
    return out


def _in_use() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    return f"in use {stats.get('bytes_in_use', 0) / 2**30:.2f} GiB of {stats.get('bytes_limit', 0) / 2**30:.2f}"


def _step_memory(params, cfg, cache, attend) -> dict:
    """The compiled decode step's memory plan in GiB (arguments, temporaries, donated aliases)."""
    b = cache.k.shape[1] if isinstance(cache, KVCache) else cache.glob_k.shape[1]
    tok = jnp.zeros((b,), jnp.int32)
    m = gen.decode_step.lower(params, cfg, cache, tok, tok, jax.random.PRNGKey(0), GREEDY, attend).compile()
    m = m.memory_analysis()
    names = ("argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    return {n.split("_size")[0] + "_gib": round(getattr(m, n, 0) / 2**30, 2) for n in names} if m else {}


def batch_decode(params, cfg, n_tokens, setting, rate, steps, hbm_free: int) -> dict:
    """Largest batch per cache that fits in `hbm_free` bytes, and decode tokens/s at it."""
    per_row_full = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # bf16 K + V of one token
    size = gen.cache_bucket(n_tokens + steps)
    full_row = per_row_full * size
    cap = setting.resolve_capacity(n_tokens + steps)
    dual_row = per_row_full * (setting.window + setting.chunk + cap) * 1.02  # + positions, scores, bits
    out = {"full_row_bytes": full_row, "dual_row_bytes": int(dual_row)}
    if hbm_free <= 0:
        raise ValueError(
            f"no free device memory reported ({hbm_free} bytes; the platform allocator reports no limit): "
            "pass --batch-memory GiB"
        )
    for name, row in (("full", full_row), ("dual", dual_row)):
        b = int(hbm_free // row)  # the estimate; lowered until the decode really runs
        cache = None
        while b >= 1:
            try:
                if name == "full":
                    cache, attend = synthetic_full(cfg, b, size), FullAttend("decode", _ragged())
                else:
                    cache = synthetic_dual(cfg, b, n_tokens, setting, rate)
                    adm = FixedAdmission("random", rate=rate, seed=0)
                    attend = DualAttend(adm, impl=_ragged(), batched_promotion=True)
                plan = _step_memory(params, cfg, cache, attend)
                log(f"{name} cache at batch {b}: {plan}; {_in_use()}")
                ms, cache = _step_ms(params, cfg, cache, n_tokens, attend, steps)
                out[f"{name}_step_memory"] = plan
                break
            except jax.errors.JaxRuntimeError as err:
                if "RESOURCE_EXHAUSTED" not in str(err):
                    raise
                log(f"{name} cache at batch {b} does not fit; trying {b - 1}")
                cache = None
                b -= 1
        del cache
        out[f"{name}_max_batch"] = b
        if b >= 1:
            out[f"{name}_step_ms"] = ms
            out[f"{name}_tokens_per_s"] = b * 1e3 / ms
    if out.get("full_max_batch"):
        out["batch_ratio"] = out["dual_max_batch"] / out["full_max_batch"]
        out["throughput_ratio"] = out["dual_tokens_per_s"] / out["full_tokens_per_s"]
    return out


def machine() -> dict:
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "hbm_bytes": stats.get("bytes_limit"),
        "allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default (BFC)"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run(
    contexts, parts, *, rate=0.2, window=256, chunk=2048, capacity_fraction=0.22, steps=32, repeats=5,
    hbm_peak_gbps=3350.0, cfg: ModelConfig = LLAMA31_8B, e2e_contexts=None, batch_memory=None, batch_contexts=None,
    layers="fused", on_update=None, sweep=True,
) -> dict:  # fmt: skip
    """Run the requested parts ("check", "attention", "e2e", "batch") for each context length.

    layers: the weight layout of the end-to-end and batch parts (`model_params`), prefill and
    decode alike.

    sweep: time the prefill and decode tile candidates (TILINGS, DECODE_TILINGS) at the first
    context of the attention part (GPU kernels only)."""
    setting = CacheConfig(window=window, chunk=chunk, capacity_fraction=capacity_fraction)
    result = {
        "machine": machine(),
        "model": dataclasses.asdict(cfg) | {"rope_scaling": None},
        "settings": {"rate": rate, "window": window, "chunk": chunk, "capacity_fraction": capacity_fraction,
                     "decode_steps": steps, "hbm_peak_gbps": hbm_peak_gbps,
                     "layers": layers},
        "contexts": {},
    }  # fmt: skip
    params = None
    for n in contexts:
        row = result["contexts"].setdefault(str(n), {})
        if "check" in parts:
            log(f"{n}: kernel vs reference")
            row["check"] = check_kernel(cfg, min(n, 16384), setting, rate)
        if "attention" in parts:
            log(f"{n}: attention-only prefill")
            sweep_here = sweep and n == contexts[0] and _ragged() == "pallas"
            tilings = TILINGS if sweep_here else ()
            row["attention_prefill"] = attention_prefill(cfg, n, setting, rate, repeats, tilings)
            log(f"{n}: attention-only decode")
            dec_tilings = DECODE_TILINGS if sweep_here else ()
            row["attention_decode"] = attention_decode(cfg, n, setting, rate, repeats, tilings=dec_tilings, traced=True)
            log(json.dumps(row))
            if on_update:
                on_update(result)
        do_batch = "batch" in parts and (batch_contexts is None or n in batch_contexts)
        do_e2e = "e2e" in parts and (e2e_contexts is None or n in e2e_contexts)
        if (do_e2e or do_batch) and params is None:
            params = model_params(cfg, layers)
            result["weight_bytes"] = nbytes(params)
        if do_e2e:
            log(f"{n}: end to end")
            e2e = end_to_end(params, cfg, n, setting, rate, steps)
            token_bytes = e2e["full_kv_bytes"] / gen.cache_bucket(n + steps)  # K/V of one position, all layers
            read = {"full": (n + 1) * token_bytes, "dual": (e2e["dual_stored_fraction"] * n + window) * token_bytes}
            for name, kv in read.items():
                floor_ms = (result["weight_bytes"] + kv) / hbm_peak_gbps / 1e6
                e2e[f"{name}_decode_floor_ms"] = floor_ms
                e2e[f"{name}_decode_of_floor"] = floor_ms / e2e[f"{name}_decode_ms"]
            row["end_to_end"] = e2e
            log(json.dumps(e2e))
            if on_update:
                on_update(result)
        if do_batch:
            log(f"{n}: largest batches")
            stats = jax.devices()[0].memory_stats() or {}
            free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            row["batch"] = batch_decode(params, cfg, n, setting, rate, steps, batch_memory or int(free * 0.9))
        log(json.dumps(row))
        if on_update:
            on_update(result)
    return result


MERGE_SETTINGS = ("rate", "window", "chunk", "capacity_fraction", "hbm_peak_gbps")


def _layout(result: dict, part: str) -> str:
    """The weight layout a run's `part` ran on (end_to_end: prefill and decode; batch: decode)."""
    s = result["settings"]
    if "layers" in s:
        return s["layers"]
    # runs before `layers`: the end-to-end prefill ran on the scanned stack, decode on decode_layers
    return s.get("decode_layers") if part == "batch" else f"scanned prefill, {s.get('decode_layers')} decode"


def _has_part(result: dict, part: str) -> bool:
    return any(part in row for row in result["contexts"].values())


def merge_results(results: list[dict], names: list[str] | None = None) -> dict:
    """One result from the JSONs of several runs (parts or contexts measured in separate
    processes, e.g. the batch part under another allocator): rows are merged per context and
    part (a later run's part replaces an earlier one's), every run's machine is kept under
    "runs". Runs of different settings or devices are refused."""
    if not results:
        raise ValueError("merge_results: no results to merge")
    names = names or [str(i) for i in range(len(results))]
    first = results[0]
    out = {k: v for k, v in first.items() if k != "contexts"} | {"contexts": {}, "runs": {}}
    for name, res in zip(names, results, strict=True):
        for key in MERGE_SETTINGS:
            mine, theirs = first["settings"].get(key), res["settings"].get(key)
            if mine != theirs:
                raise ValueError(f"merge_results: {name} has {key}={theirs!r}, {names[0]} has {mine!r}")
        for part in ("end_to_end", "batch"):  # the weight layout matters to the model parts only
            mine, theirs = _layout(first, part), _layout(res, part)
            if _has_part(first, part) and _has_part(res, part) and mine != theirs:
                raise ValueError(f"merge_results: {name}'s {part} ran on layers={theirs!r}, {names[0]}'s on {mine!r}")
        dev, dev0 = res["machine"]["device"], first["machine"]["device"]
        if dev != dev0:
            raise ValueError(f"merge_results: {name} ran on {dev!r}, {names[0]} on {dev0!r}")
        out["runs"][name] = res["machine"] | {"parts": sorted({p for row in res["contexts"].values() for p in row})}
        for ctx, row in res["contexts"].items():
            out["contexts"].setdefault(ctx, {}).update(row)
        if "weight_bytes" in res:
            out["weight_bytes"] = res["weight_bytes"]
    out["contexts"] = dict(sorted(out["contexts"].items(), key=lambda kv: int(kv[0])))
    return out


def plot(result: dict, path) -> None:
    """A PNG of the measured ratios: attention-only and end-to-end, full vs dual, per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = sorted(result["contexts"], key=int)
    x = [int(c) // 1024 for c in ctx]
    panels = [
        ("attention_prefill", "full_cudnn_ms", "dual_kernel_ms", "prefill attention, 1 layer (ms)"),
        ("attention_decode", "full_pallas_ms", "dual_pallas_ms", "decode attention, 1 layer (ms)"),
        ("end_to_end", "full_prefill_s", "dual_prefill_s", "prefill, 32 layers (s)"),
        ("end_to_end", "full_decode_ms", "dual_decode_ms", "decode, 32 layers (ms / token)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (part, full_key, dual_key, title) in zip(axes, panels, strict=True):
        pts = [(xi, result["contexts"][c][part]) for xi, c in zip(x, ctx, strict=True) if part in result["contexts"][c]]
        if part == "attention_decode" and pts and all("trace" in p for _, p in pts):
            # device time per call, from the trace of the unrolled calls (as the decode step calls them)
            pts = [(xi, {k: p["trace"][f"{k}_pallas"]["span_ms"] for k in ("full", "dual")}) for xi, p in pts]
            full_key, dual_key, title = "full", "dual", "decode attention, 1 layer (ms, device time)"
        elif part == "attention_decode" and all("dual_pallas_unrolled_ms" in p for _, p in pts):
            full_key, dual_key = "full_pallas_unrolled_ms", "dual_pallas_unrolled_ms"  # as the decode step calls it
        if not pts:
            ax.set_visible(False)
            continue
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1][full_key] for p in pts], "o-", label="full cache")
        ax.plot(xs, [p[1][dual_key] for p in pts], "s-", label="WG-KV dual cache")
        for xi, p in pts:
            ax.annotate(f"{p[full_key] / p[dual_key]:.1f}x", (xi, p[dual_key]), textcoords="offset points",
                        xytext=(0, -12), ha="center", fontsize=8)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("context (K tokens)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.grid(alpha=0.3)
    shown = [ax for ax in axes if ax.get_visible()]
    if not shown:  # e.g. a batch-only run: nothing to draw
        plt.close(fig)
        return
    shown[0].legend(fontsize=8)
    m, st = result["machine"], result["settings"]
    fig.suptitle(
        f"Llama-3.1-8B shape, bf16, batch 1, {st['rate']:.0%} random admission, W={st['window']}: "
        f"{m['device']}, JAX {m['jax']}, {m['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
