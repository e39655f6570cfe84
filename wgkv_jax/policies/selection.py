"""Exact top-k selection under a budget, and order-preserving compaction into a static capacity.

    keep_bkn = select(scores_bkn, valid_bkn, protect_bkn, PerHead(KeepRatio(0.25)))
    k_bkce, v_bkce, pos_bkc, length_bk = compact(k_bkne, v_bkne, pos_bkn, keep_bkn, c_out)

`select` ranks every entry by one int32 key and takes `lax.top_k` of it, so the kept set is exact
and deterministic (reference/baselines.md invariants I2, I5, I6, I9):

    rank order:  protected  >  (PerLayer/Global safeguard)  >  valid, by score  >  invalid
                 ties (equal key) go to the lower index = the older slot (`lax.top_k`'s rule)

    key(score) = float32 bits, sign-folded so that integer order == float order:
                 b >= 0 -> b,   b < 0 -> b ^ 0x7fffffff        (-inf > INT32_MIN, +inf < INT32_MAX - 1)

A valid entry scored -inf can still be kept when the budget needs it (it ranks above every invalid
entry), an invalid one never is (the mask is ANDed with `valid`). NaN scores rank as -inf.
When fewer than k entries are valid every valid entry is kept, so a short context is never emptied.

`compact` is the stable gather of section 1.2 item 3: survivors move to the front in order of
position (slot order for ties), keep their positions, and empty slots get pos -1 and zero K/V.
Its output has exactly c_out slots, so compaction saves real memory; `keep & valid` alone is the
mask-only mode (kvpress's "fake compression").

Axis letters: l layer, b batch, k KV head, n key slot, c compacted slot, e head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from wgkv_jax.policies.budgets import Global, KeepRatio, PerHead, PerLayer, Threshold, as_budget

_INT32_MAX = jnp.iinfo(jnp.int32).max
_PROTECTED = _INT32_MAX  # above key(+inf) = 0x7f800000
_SAFEGUARD = _INT32_MAX - 1
_EXCLUDED = jnp.iinfo(jnp.int32).min  # below key(-inf) = -0x7f800001


def _order_key(scores: jax.Array, valid: jax.Array, protect: jax.Array) -> jax.Array:
    """The int32 rank key of `select` (higher = kept first); see the module docstring."""
    s = scores.astype(jnp.float32)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    s = jnp.where(s == 0.0, 0.0, s)  # -0.0 == +0.0 as scores, so they must get one key
    bits = lax.bitcast_convert_type(s, jnp.int32)
    key = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
    key = jnp.where(valid, key, _EXCLUDED)
    return jnp.where(protect & valid, _PROTECTED, key)


def _top_k_mask(key: jax.Array, k: int) -> jax.Array:
    """Bool mask of the k largest keys along the last axis (ties: lower index first)."""
    _, idx = lax.top_k(key, k)
    return jnp.put_along_axis(jnp.zeros(key.shape, bool), idx, True, axis=-1, inplace=False)


def _safeguard(key_hn: jax.Array, valid_hn: jax.Array, n_safe: int) -> jax.Array:
    """Promote each head's own top n_safe valid entries above the shared competition (AdaKV)."""
    if n_safe < 1:
        return key_hn
    safe = _top_k_mask(key_hn, min(n_safe, key_hn.shape[-1])) & valid_hn
    return jnp.where(safe & (key_hn < _PROTECTED), _SAFEGUARD, key_hn)


def select(scores: jax.Array, valid: jax.Array | None, protect: jax.Array | None = None, budget=None) -> jax.Array:
    """The keep mask of `budget` over `scores` (higher = keep).

    Args:
      scores: float [..., K, N] (for `Global`: [L, ..., K, N], layers leading as in the caches).
      valid: bool, broadcastable to `scores`; entries that may be kept (False on padding and empty
        slots). None: every entry scoring above -inf.
      protect: bool, broadcastable to `scores`, or None; valid protected entries rank above all
        others (sinks, system prompt, recent window). If more than k are protected, the k with the
        lowest index are kept: callers keep protection within the budget (the policies check it).
      budget: a budget kind (`PerHead`, `PerLayer`, `Global`, `Threshold`) or a bare size
        (`KeepRatio` / `Tokens`, meaning `PerHead`). Default: keep everything.

    Returns:
      bool mask shaped like `scores`: exactly k entries per head / layer / row when at least k are
      valid, else every valid entry; never an invalid one. k is static (see budgets.py).
    """
    budget = as_budget(PerHead(KeepRatio(1.0)) if budget is None else budget)
    valid = scores > -jnp.inf if valid is None else jnp.broadcast_to(valid, scores.shape)
    protect = jnp.zeros(scores.shape, bool) if protect is None else jnp.broadcast_to(protect, scores.shape)
    if scores.ndim < 2:
        raise ValueError(f"scores must be [..., K, N] (heads, slots); got shape {scores.shape}")
    with jax.named_scope("policy_select"):
        if isinstance(budget, Threshold):
            return valid & (protect | (scores > budget.tau))
        key = _order_key(scores, valid, protect)
        heads, slots = scores.shape[-2:]
        if isinstance(budget, PerHead):
            keep = _top_k_mask(key, budget.count(slots))
        elif isinstance(budget, PerLayer):
            k = budget.count(slots, heads)
            key = _safeguard(key, valid, int(budget.alpha * k / heads))
            flat = key.reshape(*key.shape[:-2], heads * slots)
            keep = _top_k_mask(flat, k).reshape(key.shape)
        elif isinstance(budget, Global):
            if scores.ndim < 3:
                raise ValueError(f"Global budget needs scores stacked over layers, [L, ..., K, N]; got {scores.shape}")
            layers = scores.shape[0]
            k = budget.count(slots, layers * heads)
            key = _safeguard(key, valid, int(budget.alpha * k / (layers * heads)))
            key_xlkn = jnp.moveaxis(key, 0, -3)  # layers beside the heads, so one row flattens to [L * K * N]
            flat = key_xlkn.reshape(*key_xlkn.shape[:-3], layers * heads * slots)
            keep = jnp.moveaxis(_top_k_mask(flat, k).reshape(key_xlkn.shape), -3, 0)
        else:  # pragma: no cover - as_budget admits nothing else
            raise ValueError(f"unsupported budget {budget!r}")
        return keep & valid


def compact(
    k_bkne: jax.Array, v_bkne: jax.Array, pos_bkn: jax.Array, keep_bkn: jax.Array, c_out: int, extras: tuple = ()
):
    """Gather the kept entries, in order, into a static capacity of `c_out` slots.

    ::

        slot      0   1   2   3   4   5          keep = [1 0 1 1 0 1], c_out = 4
        pos       0   1   2   3   4   5
        out slot  0   .   1   2   .   3   ->  pos' = [0 2 3 5], length = 4

    Survivors are ordered by position (ties and everything else by slot), so for slot-ordered inputs
    (a full cache, a fresh prefill) this is slot order; stores whose slots left position order after
    an eviction come back sorted. If more than c_out entries are kept, the c_out oldest survive.

    Args:
      k_bkne, v_bkne: [..., N, E] keys and values (any leading axes, e.g. [B, K]).
      pos_bkn: int [..., N] absolute positions. keep_bkn: bool [..., N].
      c_out: static output capacity (may exceed N; the extra slots are empty).
      extras: more per-slot arrays [..., N] (e.g. scores) gathered the same way.

    Returns:
      (k [..., c_out, E], v [..., c_out, E], pos [..., c_out] with -1 on empty slots, length [...]
      int32 = min(kept, c_out)); empty slots hold zeros. With `extras`, their gathered [..., c_out]
      versions (zeros on empty slots) follow as a fifth element, a tuple.
    """
    if c_out < 1:
        raise ValueError(f"compact capacity c_out={c_out} must be >= 1")
    n = pos_bkn.shape[-1]
    m = min(c_out, n)
    with jax.named_scope("policy_compact"):
        # top_k of the negated key = the m smallest (keep first, by position), ties by lower slot
        sort_key = jnp.where(keep_bkn, pos_bkn.astype(jnp.int32), _INT32_MAX)
        _, idx = lax.top_k(-sort_key, m)
        kept = jnp.take_along_axis(keep_bkn, idx, axis=-1)
        pos = jnp.where(kept, jnp.take_along_axis(pos_bkn.astype(jnp.int32), idx, axis=-1), -1)
        k = jnp.where(kept[..., None], jnp.take_along_axis(k_bkne, idx[..., None], axis=-2), 0)
        v = jnp.where(kept[..., None], jnp.take_along_axis(v_bkne, idx[..., None], axis=-2), 0)
        more = tuple(jnp.where(kept, jnp.take_along_axis(x, idx, axis=-1), 0) for x in extras)
        if c_out > n:
            extra = c_out - n
            pad = [(0, 0)] * (k.ndim - 2) + [(0, extra), (0, 0)]
            k, v = jnp.pad(k, pad), jnp.pad(v, pad)
            pos = jnp.pad(pos, pad[:-1], constant_values=-1)
            more = tuple(jnp.pad(x, pad[:-1]) for x in more)
        length = jnp.minimum(jnp.sum(keep_bkn, axis=-1, dtype=jnp.int32), c_out)
        return (k, v, pos, length, more) if extras else (k, v, pos, length)
