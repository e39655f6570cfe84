"""Budgets: how many entries an eviction (or selection) step keeps, as static, hashable data.

A budget is a *kind* holding a *size*::

    PerHead(KeepRatio(0.25))           every (row, KV head) keeps floor(0.25 * N) of its N slots
    PerLayer(Tokens(64), alpha=0.2)    a layer keeps 64 * K entries in all, spread unevenly over its
                                       K heads (AdaKV), each head guaranteed floor(alpha * 64)
    Global(KeepRatio(0.3))             all L layers together keep floor(0.3 * L * K * N) (KVzip "pair")
    Threshold(tau)                     keep every entry scoring above tau; a mask, no fixed count

Sizes are relative to the *static* slot count N (the cache capacity or the length bucket), never to
the number of live tokens, so the count `k` is a Python int fixed at trace time and `lax.top_k`
gets a static k (reference/baselines.md section 1.3). `Tokens(n)` is per head on average for every
kind, so the same `Tokens(n)` costs the same memory under PerHead, PerLayer and Global. A count is
clamped to [1, total] so that a short context is never emptied (kvpress PR #264).

KVzip and kvpress name the two ratio conventions oppositely; this library only has the keep ratio
(kept / total, in (0, 1]); a compression ratio kappa is `KeepRatio(1 - kappa)`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


@dataclasses.dataclass(frozen=True)
class KeepRatio:
    """Keep floor(ratio * slots) entries; ratio in (0, 1] (1 keeps everything)."""

    ratio: float

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"keep ratio {self.ratio!r} must be a number in (0, 1] (kept / total)")

    def count(self, slots: int, heads: int = 1) -> int:
        """The static number of entries kept out of `slots * heads` (clamped to [1, slots * heads])."""
        total = slots * heads
        # the epsilon keeps e.g. 0.7 * 10 = 7.000000000000001 and 0.29 * 100 = 28.999999999999996 exact
        return min(total, max(1, math.floor(self.ratio * total + 1e-9)))


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Keep n entries per head (per head on average for PerLayer / Global)."""

    n: int

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1:
            raise ValueError(f"token budget {self.n!r} must be an integer >= 1 (entries kept per head)")

    def count(self, slots: int, heads: int = 1) -> int:
        return min(slots * heads, int(self.n) * heads)


Size = KeepRatio | Tokens


def _check_size(kind: str, size) -> None:
    if not isinstance(size, KeepRatio | Tokens):
        raise ValueError(f"{kind} budget size {size!r} must be KeepRatio(ratio) or Tokens(n)")


def _check_alpha(kind: str, alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{kind} safeguard alpha={alpha!r} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class PerHead:
    """The same count k for every (row, KV head): `top_k` over the slot axis."""

    size: Size

    def __post_init__(self):
        _check_size("PerHead", self.size)

    def count(self, slots: int) -> int:
        return self.size.count(slots)


@dataclasses.dataclass(frozen=True)
class PerLayer:
    """One count for all K heads of a layer (per row), spread by score: flatten [K * N], `top_k`.

    This is AdaKV's allocation (Feng et al. 2024, kvpress `AdaKVPress`). With alpha > 0 every head
    first keeps its own top floor(alpha * k / K) entries (AdaKV's safeguard; their default 0.2), the
    rest of the budget going to the highest scores of the layer.
    """

    size: Size
    alpha: float = 0.2

    def __post_init__(self):
        _check_size("PerLayer", self.size)
        _check_alpha("PerLayer", self.alpha)

    def count(self, slots: int, heads: int) -> int:
        return self.size.count(slots, heads)


@dataclasses.dataclass(frozen=True)
class Global:
    """One count for all L layers and K heads (per row): flatten [L * K * N], `top_k`.

    KVzip's default ("pair" level) with the kvpress-exact top_k tie rule; its scores need every
    layer first, so `select` takes them stacked as [L, B, K, N]. alpha as in `PerLayer`, per
    (layer, head); KVzip has none (default 0).
    """

    size: Size
    alpha: float = 0.0

    def __post_init__(self):
        _check_size("Global", self.size)
        _check_alpha("Global", self.alpha)

    def count(self, slots: int, heads: int) -> int:
        return self.size.count(slots, heads)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Keep every valid entry scoring strictly above tau (DMS / KVzap style); the count is data
    dependent, so the result is a mask only (compact it into a capacity that bounds it)."""

    tau: float

    def __post_init__(self):
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real) or math.isnan(self.tau):
            raise ValueError(f"threshold tau={self.tau!r} must be a number")


Budget = PerHead | PerLayer | Global | Threshold


def as_budget(budget) -> Budget:
    """`budget` if it is a budget kind; a bare size means PerHead(size)."""
    if isinstance(budget, KeepRatio | Tokens):
        return PerHead(budget)
    if isinstance(budget, PerHead | PerLayer | Global | Threshold):
        return budget
    raise ValueError(
        f"budget {budget!r} must be PerHead / PerLayer / Global (holding KeepRatio or Tokens) or Threshold(tau)"
    )
