"""Capacity per layer: the dual cache as one single-layer `DualCache` per layer, each store sized
to that layer's own need.

An eviction policy with a ragged budget (`PerLayer`, AdaKV; `Global`, KVzip's default) keeps very
different counts in different layers. The stacked `DualCache` ([L, B, K, C, E]) must give every
layer the largest count; `PerLayerCache` gives layer l the capacity C_l = (its largest per-head
count + room), so the memory a ragged budget saves across layers is really freed
(reference/baselines.md section 1.3, "capacity-per-layer"). The heads of one layer still share
C_l (a paged store would free that too).

Layer l's cache is a `DualCache` with a leading axis of 1, run by the unchanged `DualAttend` at
layer index 0, so every path (reference attention, Pallas ragged kernel, batched promotion,
overflow) is the stacked one. The layer index must be static: the model has to run its layers
unrolled (`load_model(..., layers="unrolled")`, params["layers"] a list), since a `lax.scan`
cannot carry buffers of different shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wgkv_jax.cache.dual import DualAttend, DualCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PerLayerCache:
    """One single-layer `DualCache` per layer (capacities may differ). The read-only properties
    mirror `DualCache`'s, with per-head arrays concatenated back to [L, B, K]."""

    layers: tuple[DualCache, ...]

    @property
    def window(self) -> int:
        return self.layers[0].window

    @property
    def ring_size(self) -> int:
        return self.layers[0].ring_size

    @property
    def ring_k(self) -> jax.Array:  # dtype and ring shape of layer 0 (all layers share them)
        return self.layers[0].ring_k

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(c.capacity for c in self.layers)

    @property
    def capacity(self) -> int:
        """The largest layer capacity (what the stacked cache would give every layer)."""
        return max(self.capacities)

    @property
    def length(self) -> jax.Array:
        return jnp.concatenate([c.length for c in self.layers])

    @property
    def evicted(self) -> jax.Array:
        return jnp.concatenate([c.evicted for c in self.layers])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    @property
    def kv_nbytes(self) -> int:
        return sum(c.kv_nbytes for c in self.layers)

    @classmethod
    def split(cls, cache: DualCache) -> PerLayerCache:
        """The stacked cache's layers as single-layer caches (same capacity)."""
        n = cache.length.shape[0]
        return cls(tuple(jax.tree.map(lambda x, i=i: x[i : i + 1], cache) for i in range(n)))


@dataclasses.dataclass(frozen=True)
class PerLayerAttend:
    """`Attend` hook over a `PerLayerCache`: runs `inner` (a `DualAttend`) on layer `layer`'s own
    single-layer cache. Needs a Python-int layer index (unrolled layers)."""

    inner: DualAttend

    def before_decode(self, caches: PerLayerCache, pos_b) -> PerLayerCache:
        return PerLayerCache(tuple(self.inner.before_decode(c, pos_b) for c in caches.layers))

    def __call__(self, caches: PerLayerCache, layer, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt):
        if not isinstance(layer, int):
            raise TypeError(
                "a cache with a capacity per layer needs the layers unrolled (a static layer index): load the model "
                "with layers='unrolled' (params['layers'] a list)"
            )
        out, one = self.inner(caches.layers[layer], 0, p, q_btkgd, k_pre_btke, k_btke, v_btke, pos_bt)
        layers = (*caches.layers[:layer], one, *caches.layers[layer + 1 :])
        return out, PerLayerCache(layers)


def wrap_attend(attend, state):
    """`attend` as it must run on `state`: wrapped when the state is a `PerLayerCache`."""
    if isinstance(state, PerLayerCache) and not isinstance(attend, PerLayerAttend):
        return PerLayerAttend(attend)
    return attend
