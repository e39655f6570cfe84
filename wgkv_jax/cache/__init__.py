"""KV caches: the plain full cache, the WG-KV dual cache (local ring + global store), its per-layer
form after a ragged eviction, its paged form (`wgkv_jax.cache.paged`: one page pool for every
layer and head), and the Cascading KV cache (`wgkv_jax.cache.cascading`)."""

from wgkv_jax.cache.admission import Admission, FixedAdmission, GateAdmission
from wgkv_jax.cache.dual import CacheConfig, CapacityError, DualAttend, DualCache, parts_attention
from wgkv_jax.cache.full import KVCache, decode_attend, prefill_attend
from wgkv_jax.cache.paged import PagedDualCache
from wgkv_jax.cache.per_layer import PerLayerAttend, PerLayerCache
from wgkv_jax.cache.reference import ReferenceAttend, admission_mask, reference_logits

__all__ = [
    "Admission",
    "CacheConfig",
    "CapacityError",
    "DualAttend",
    "DualCache",
    "FixedAdmission",
    "GateAdmission",
    "KVCache",
    "PagedDualCache",
    "PerLayerAttend",
    "PerLayerCache",
    "ReferenceAttend",
    "admission_mask",
    "decode_attend",
    "parts_attention",
    "prefill_attend",
    "reference_logits",
]
