"""A paged global store for the dual cache: one page pool shared by every layer, batch row and KV
head, so ragged per-head admission costs only the pages it uses.

    pool_k, pool_v   [P, page, E]        pages; the last one is a zero sentinel that is never written
    table            [L, B, K, C / page]  page of each (layer, row, head)'s logical store block, -1 = none
    next_free        []                   bump allocator: pages [next_free, P - 1) are free

Everything else (the local ring, per-slot positions and scores, lengths, counters) is the
`DualCache`'s, so `DualAttend` runs a `PagedDualCache` unchanged: it reads a layer's store through
the page table (`store_kv`) and writes promoted tokens through it (`store_write`), taking a fresh
page from the pool when a head's store crosses a page boundary. The logical capacity per head
(C) and every replacement rule stay those of the contiguous store it was made from, so decoding
on the paged cache gives the same tokens; only the allocation differs: sum over heads of
ceil(length / page) pages plus the spare pages, instead of L * B * K * C slots.

Make one from a prefilled (and possibly evicted) dual cache with `from_dual`; decode then runs on
it (`generate(..., paged=32)` does both). Writes of one token per head per step are supported
(decode and batched promotion); prefill chunks and context continuation stay on the contiguous
cache. If the pool runs out, the token is not stored and is counted in `evicted` (the capacity
error of `generate(stop_on_evict=True)` reports it); `from_dual`'s default spare pages cover
`room` new tokens for every head, so that cannot happen within `room` decode steps.

Reads: the GPU Pallas kernel (`kernels.ragged.ragged_attention(..., table=)`) follows the page
table itself, one page per key block (pages of 16 or more slots); the reference path, Quest and
the TPU kernel read the layer's pages gathered into a [B, K, C, E] view (`store_kv`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from wgkv_jax.cache.dual import DualCache
from wgkv_jax.kernels import ragged


@dataclasses.dataclass
class PagedDualCache:
    ring_k: jax.Array
    ring_v: jax.Array
    ring_kpre: jax.Array
    ring_admit: jax.Array
    ring_score: jax.Array
    pool_k: jax.Array
    pool_v: jax.Array
    table: jax.Array
    next_free: jax.Array
    glob_pos: jax.Array
    glob_score: jax.Array
    length: jax.Array
    evicted: jax.Array
    window: int = dataclasses.field(default=256, metadata={"static": True})

    @property
    def ring_size(self) -> int:
        return self.ring_k.shape[3]

    @property
    def page(self) -> int:
        return self.pool_k.shape[1]

    @property
    def pages(self) -> int:
        """Pool size P (the sentinel included)."""
        return self.pool_k.shape[0]

    @property
    def capacity(self) -> int:
        """Logical store slots per head (C), as in the contiguous cache this one was made from."""
        return self.glob_pos.shape[3]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def kv_nbytes(self) -> int:
        """Allocated bytes of the K/V payload (ring + page pool) and the page table."""
        return self.ring_k.nbytes + self.ring_v.nbytes + self.pool_k.nbytes + self.pool_v.nbytes + self.table.nbytes

    def store_kv(self, layer):
        """One layer's store as contiguous [B, K, C, E] keys and values, gathered through the page table."""
        return ragged.gather_pages(self.pool_k, self.table[layer]), ragged.gather_pages(self.pool_v, self.table[layer])

    def store_write(self, g_at, cand_k, cand_v, new_len, over):
        """Write one candidate per head (g_at's slot axis has size 1) through the page table,
        allocating a page from the pool for a slot that opens a new page. A head refused a page
        keeps its old length and counts the token in `over`."""
        ll, bb, kk, dest = g_at
        if dest.shape[-1] != 1:
            raise ValueError(
                f"a paged store takes one new token per head per step (decode); got {dest.shape[-1]}: "
                "run prefill chunks on the contiguous DualCache and convert with paged.from_dual"
            )
        page, cap = self.page, self.capacity
        live = dest < cap  # _slot_dest sends dropped candidates to slot C
        blk = jnp.minimum(dest // page, cap // page - 1)
        cur = self.table[ll, bb, kk, blk]
        need = live & (cur < 0)
        rank = (jnp.cumsum(need.reshape(-1)) - 1).reshape(need.shape)
        new_id = self.next_free + rank
        granted = need & (new_id < self.pages - 1)
        table = self.table.at[ll, bb, kk, blk].set(jnp.where(granted, new_id, cur))
        page_id = jnp.where(need, jnp.where(granted, new_id, self.pages), jnp.where(live, cur, self.pages))
        at = (page_id, dest % page)
        fields = {
            "pool_k": self.pool_k.at[at].set(cand_k, mode="drop"),
            "pool_v": self.pool_v.at[at].set(cand_v, mode="drop"),
            "table": table,
            "next_free": self.next_free + jnp.sum(granted, dtype=jnp.int32),
        }
        refused = jnp.sum(need & ~granted, axis=-1, dtype=new_len.dtype)
        return fields, new_len - refused, over + refused


jax.tree_util.register_dataclass(
    PagedDualCache,
    data_fields=[f.name for f in dataclasses.fields(PagedDualCache) if f.name != "window"],
    meta_fields=["window"],
)


def from_dual(cache: DualCache, page: int = 32, room: int = 0, spare_pages: int | None = None) -> PagedDualCache:
    """The paged form of a contiguous dual cache (outside jit: the page count follows the lengths).

    Every (layer, row, head) gets ceil(length / page) pages, in order; the pool adds `spare_pages`
    free pages (default: enough for `room` more tokens in every head) and the zero sentinel.
    The logical capacity per head is the contiguous cache's, rounded up to whole pages.
    """
    if not isinstance(cache, DualCache):
        raise TypeError(f"paged.from_dual takes a DualCache, got {type(cache).__name__}")
    if page < 1 or page & (page - 1):
        raise ValueError(f"page={page}: expected a power of two >= 1 (the kernels' key blocks are powers of two)")
    if room < 0 or (spare_pages is not None and spare_pages < 0):
        raise ValueError(f"room={room}, spare_pages={spare_pages}: expected values >= 0")
    n_layers, b, k, cap, e = cache.glob_k.shape
    blocks = math.ceil(cap / page)
    length = np.asarray(cache.length).reshape(-1)
    used = -(-length // page)  # pages per head
    spare = n_layers * b * k * math.ceil(room / page) if spare_pages is None else spare_pages
    n_used = int(used.sum())
    pages = n_used + spare + 1  # + the zero sentinel
    # the used pages, head after head: (head, block) of every allocated page
    head_of = np.repeat(np.arange(length.size), used)
    block_of = np.arange(n_used) - np.repeat(np.cumsum(used) - used, used)
    table = np.full((length.size, blocks), -1, np.int32)
    table[head_of, block_of] = np.arange(n_used, dtype=np.int32)

    def pool_of(x):
        x = jnp.pad(x, ((0, 0),) * 3 + ((0, blocks * page - cap), (0, 0))).reshape(-1, blocks, page, e)
        return jnp.zeros((pages, page, e), x.dtype).at[:n_used].set(x[head_of, block_of])

    pad = ((0, 0),) * 3 + ((0, blocks * page - cap),)
    return PagedDualCache(
        ring_k=cache.ring_k,
        ring_v=cache.ring_v,
        ring_kpre=cache.ring_kpre,
        ring_admit=cache.ring_admit,
        ring_score=cache.ring_score,
        pool_k=pool_of(cache.glob_k),
        pool_v=pool_of(cache.glob_v),
        table=jnp.asarray(table.reshape(n_layers, b, k, blocks)),
        next_free=jnp.asarray(n_used, jnp.int32),
        glob_pos=jnp.pad(cache.glob_pos, pad, constant_values=-1),
        glob_score=jnp.pad(cache.glob_score, pad),
        length=cache.length,
        evicted=cache.evicted,
        window=cache.window,
    )
