"""KV caches. `KVCache` is the plain full cache; the WG-KV dual cache builds on the same hooks."""

from wgkv_jax.cache.full import KVCache, decode_attend, prefill_attend

__all__ = ["KVCache", "decode_attend", "prefill_attend"]
