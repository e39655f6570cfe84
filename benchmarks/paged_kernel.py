"""Decode attention on the paged global store vs the contiguous store, per layer (GPU).

    python benchmarks/paged_kernel.py --out results/paged_kernel_h100.json
    python benchmarks/paged_kernel.py --smoke --out /tmp/paged_kernel.json      # CPU, interpret mode

A Llama-3.1-8B attention shape (8 KV heads, 32 query heads, head_dim 128, bf16, batch 1) with
a dual cache as a chunked prefill of each context leaves it (`infer.bench.synthetic_dual`).
Admission is ragged across heads: each (layer, head) draws its own rate uniformly in
[rate_lo, rate_hi] (mean 0.2, as the original profiling's 20%), so the contiguous store must give
every head the capacity of the fullest one, while the page pool holds what each head uses.

For each context and page size: the Pallas decode kernel on the contiguous store and through the
page table (the same entries), the kernel vs the float32 oracle (`paged_reference`), times as the
mean over a scan of all 32 layers (as `infer.bench` times decode attention), and the K/V bytes of
the two stores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs.models import LLAMA31_8B
from wgkv_jax.cache import paged as paged_store
from wgkv_jax.cache.dual import CacheConfig, DualCache
from wgkv_jax.infer.bench import _ragged, log, machine, per_layer_ms, write_result
from wgkv_jax.kernels import ragged


def ragged_dual(cfg, n_tokens: int, window: int, rate_lo: float, rate_hi: float, seed: int = 0) -> DualCache:
    """A dual cache whose heads admitted different fractions of the tokens beyond the window
    (random K/V; positions sorted, as a prefill stores them)."""
    rng = np.random.default_rng(seed)
    lbk = (cfg.n_layers, 1, cfg.n_kv_heads)
    beyond = max(n_tokens - window, 0)
    rates = rng.uniform(rate_lo, rate_hi, lbk)
    picks = [np.sort(rng.choice(beyond, int(r * beyond), replace=False)) for r in rates.reshape(-1)]
    cap = -(-max(len(p) for p in picks) // 64) * 64
    pos = np.full((*lbk, cap), -1, np.int32)
    length = np.zeros(lbk, np.int32)
    for i, p in enumerate(picks):
        pos.reshape(-1, cap)[i, : len(p)] = p
        length.reshape(-1)[i] = len(p)
    cache = DualCache.zeros(cfg, 1, window, cap, jnp.bfloat16, chunk=CacheConfig().chunk)
    key = jax.random.PRNGKey(seed)

    def fill(i, x):
        return jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32).astype(x.dtype)

    return dataclasses.replace(
        cache,
        ring_k=fill(1, cache.ring_k),
        ring_v=fill(2, cache.ring_v),
        glob_k=fill(3, cache.glob_k),
        glob_v=fill(4, cache.glob_v),
        glob_pos=jnp.asarray(pos),
        length=jnp.asarray(length),
    )


def measure(cfg, n_tokens: int, page: int, args) -> dict:
    w, g, n_layers = args.window, cfg.group_size, cfg.n_layers
    dual = ragged_dual(cfg, n_tokens, w, args.rate_lo, args.rate_hi)
    pg = paged_store.from_dual(dual, page=page, room=0)
    q = jax.random.normal(jax.random.PRNGKey(3), (1, 1, cfg.n_kv_heads, g, cfg.head_dim), jnp.bfloat16)
    pos = jnp.full((1, 1), n_tokens, jnp.int32)
    impl = _ragged()

    def contiguous(q, c, layer, impl=impl):
        n = c.length[layer]
        return ragged.attend_grouped(
            q, pos, c.ring_k, c.ring_v, c.glob_k, c.glob_v, c.glob_pos, n, layer,
            window=w, glob_lo=w, impl=impl, open_len_bk=n,
        )  # fmt: skip

    def paged(q, c, layer, impl=impl):
        n = c.length[layer]
        return ragged.attend_grouped(
            q, pos, c.ring_k, c.ring_v, c.pool_k, c.pool_v, c.glob_pos, n, layer,
            window=w, glob_lo=w, impl=impl, open_len_bk=n, table=c.table,
        )  # fmt: skip

    check = {}
    for layer in (0, n_layers - 1):
        want = np.asarray(paged(q, pg, layer, impl="reference"))
        for name, fn, c in (("contiguous", contiguous, dual), ("paged", paged, pg)):
            got = np.asarray(jax.jit(lambda q, c, fn=fn, layer=layer: fn(q, c, layer))(q, c))
            err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
            check[name] = max(check.get(name, 0.0), err)
    out = {"context": n_tokens, "page": page, "max_rel_err_vs_f32_oracle": check}
    out["contiguous_ms"] = per_layer_ms(contiguous, q, dual, n_layers, args.repeats)
    out["paged_ms"] = per_layer_ms(paged, q, pg, n_layers, args.repeats)
    out["paged_over_contiguous"] = out["paged_ms"] / out["contiguous_ms"]
    per_entry = 2 * cfg.head_dim * 2  # K and V, bf16
    stored = int(jnp.sum(dual.length))
    out["stored_entries"] = stored
    out["capacity"] = dual.capacity
    out["contiguous_store_bytes"] = dual.glob_k.nbytes + dual.glob_v.nbytes
    out["paged_pool_bytes"] = pg.pool_k.nbytes + pg.pool_v.nbytes
    out["stored_bytes"] = stored * per_entry
    out["read_gbps_paged"] = (stored // n_layers + cfg.n_kv_heads * w) * per_entry / out["paged_ms"] / 1e6
    log(
        f"{n_tokens} tokens, page {page}: contiguous {out['contiguous_ms']:.4f} ms, paged {out['paged_ms']:.4f} ms "
        f"({out['paged_over_contiguous']:.2f}x); store {out['contiguous_store_bytes'] / 2**30:.2f} GiB -> pool "
        f"{out['paged_pool_bytes'] / 2**30:.2f} GiB; err {check}"
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/paged_kernel.json")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--pages", type=int, nargs="+", default=[32, 64])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--rate-lo", type=float, default=0.05)
    p.add_argument("--rate-hi", type=float, default=0.35)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="CPU check: 2 layers, 1024 tokens, interpret mode")
    args = p.parse_args(argv)
    if not 0 <= args.rate_lo <= args.rate_hi <= 1:
        p.error(f"rates {args.rate_lo}..{args.rate_hi}: expected 0 <= rate_lo <= rate_hi <= 1")
    cfg = LLAMA31_8B
    if args.smoke:
        cfg = dataclasses.replace(cfg, n_layers=2)
        args.contexts, args.pages, args.repeats = [1024], [32], 1
    rows = [measure(cfg, n, page, args) for n in args.contexts for page in args.pages]
    write_result(args.out, {"benchmark": "paged_kernel", "machine": machine(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
