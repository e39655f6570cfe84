"""Policy objects: frozen (hashable, jit-static) dataclasses with one interface.

    scores = policy.score(pos=pos_bkn, valid=valid_bkn, k=k_bkne, q=q_btkge, q_pos=q_pos_bt)
    keep   = policy.select(scores, valid_bkn, protect=None)    # the policy's budget, exact
    keep   = policy.keep(pos=..., valid=..., k=..., q=..., q_pos=...)   # both at once

`score` takes keyword arrays (the ones a policy does not need are ignored; a missing one it needs
raises ValueError) and returns [B, K, N] for one layer; stack layers to [L, B, K, N] before a
`Global` budget's `select`. `Quest` is read-time selection: its scores are per query and page,
[B, T, K, G, P] ([B, T, K, P] with group="max"), and its budget counts pages.

A policy's own protected entries (StreamingLLM sinks and window, SnapKV's observation window, H2O's
recent window) score +inf; `select` checks at trace time that the budget can hold them and raises
ValueError otherwise, so "protected tokens are never evicted" and "the budget is exact" both hold.

Combinators (ours, in the spirit of kvpress `ComposedPress`):

- `Protect(sinks=S, recent=W)`: the first S and last W positions are protected (score +inf).
- `Chain([stage, ...])`: the Protect stages are OR-ed into one protect mask that applies to every
  policy stage; the policy stages run in order, each scoring and selecting among the survivors of
  the previous one (with its own budget, relative to the static N), and the last stage's budget is
  the final count. `Chain.score` returns the last stage's scores with non-survivors at -inf, and
  `Chain.select` treats -inf as dropped. `Chain([Protect(sinks=4), get("snapkv", keep_ratio=0.25)])`
  is SnapKV that never evicts the first 4 tokens.

Axis letters: l layer, b batch, k KV head, g query head within a group, t query time, n key slot,
p page, e head dim.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from wgkv_jax.policies import scores as S
from wgkv_jax.policies.budgets import Budget, Global, KeepRatio, PerHead, Threshold, Tokens, as_budget
from wgkv_jax.policies.selection import select as select_mask


def _check_int(owner: str, name: str, value, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{owner}: {name}={value!r} must be an integer >= {lo}")


def _check_choice(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} must be one of {list(choices)}")


def _need(owner: str, **arrays) -> None:
    for name, value in arrays.items():
        if value is None:
            raise ValueError(f"{owner}.score needs {name}= ({_ARG_DOCS[name]})")


_ARG_DOCS = {
    "k": "keys [B, K, N, E]",
    "v": "values [B, K, N, E]",
    "q": "queries [B, T, K, G, E]",
    "q_pos": "query positions [B, T], negative on padding",
}


def per_head_count(budget: Budget, slots: int) -> int:
    """Entries per head (on average for PerLayer / Global) that `budget` keeps out of `slots`."""
    if isinstance(budget, Threshold):
        raise ValueError(f"{budget!r} has no static count")
    return budget.size.count(slots)


def check_reserved(owner: str, budget: Budget, shape: tuple, sinks: int, recent: int) -> None:
    """Raise if the static budget cannot hold the protected sinks + recent window of every head."""
    if isinstance(budget, Threshold) or sinks + recent == 0:
        return
    slots = shape[-1]
    need = min(sinks + recent, slots)
    k = per_head_count(budget, slots)
    if k < need:
        raise ValueError(
            f"{owner}: budget {budget!r} keeps {k} of {slots} slots per head, fewer than the {need} it must protect "
            f"(sinks={sinks}, recent window={recent}); raise the budget or shrink the protected window"
        )


class Policy:
    """Shared `select` / `keep` of the policy dataclasses (each defines `budget`, `score`, `reserved`)."""

    name: ClassVar[str] = "policy"
    budget: Budget

    def reserved(self, slots: int) -> tuple[int, int]:
        """(sinks, recent window) this policy protects for `slots` key slots."""
        del slots
        return 0, 0

    def select(self, scores: jax.Array, valid: jax.Array | None = None, protect: jax.Array | None = None):
        """Keep mask of this policy's budget over `scores` (see `selection.select`); valid=None means
        every entry scored above -inf."""
        check_reserved(self.name, self.budget, scores.shape, *self.reserved(scores.shape[-1]))
        return select_mask(scores, valid, protect, self.budget)

    def keep(self, *, pos, valid, k=None, v=None, q=None, q_pos=None, protect=None) -> jax.Array:
        """`select(score(...), valid, protect)`."""
        return self.select(self.score(pos=pos, valid=valid, k=k, v=v, q=q, q_pos=q_pos), valid, protect)

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None) -> jax.Array:  # pragma: no cover
        raise NotImplementedError


def _set_budget(policy, budget, default=None) -> None:
    budget = default if budget is None else budget
    if budget is None:
        raise ValueError(f"{policy.name} needs a budget: keep_ratio=, tokens= or budget=")
    object.__setattr__(policy, "budget", as_budget(budget))


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    """Attention sinks + recent window (Xiao et al. 2023); see `scores.streaming_llm_scores`.

    Give either `window` (the budget is then exactly sinks + window per head) or a budget (the
    window is then whatever the budget leaves after the sinks), not both.
    """

    name: ClassVar[str] = "streaming_llm"
    budget: Budget | None = None
    sinks: int = 4
    window: int | None = None

    def __post_init__(self):
        _check_int(self.name, "sinks", self.sinks, 0)
        _check_int(self.name, "window", self.window, 0, allow_none=True)
        implied = None if self.window is None else PerHead(Tokens(max(1, self.sinks + self.window)))
        if self.window is not None and self.budget is not None and as_budget(self.budget) != implied:
            raise ValueError(
                f"{self.name}: give window={self.window} or a budget ({self.budget!r}), not both "
                "(with a window the budget is sinks + window)"
            )
        if self.window is not None and self.sinks + self.window < 1:
            raise ValueError(f"{self.name}: sinks + window must be >= 1, got sinks={self.sinks}, window={self.window}")
        _set_budget(self, self.budget, implied)

    def reserved(self, slots):
        return self.sinks, self.window or 0

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        return S.streaming_llm_scores(pos, valid, sinks=self.sinks, window=self.window)


@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    """Observation-window attention votes, pooled (Li et al. 2024); see `scores.snapkv_scores`."""

    name: ClassVar[str] = "snapkv"
    budget: Budget | None = None
    window: int = 32
    kernel: int = 7
    pooling: Literal["max", "avg"] = "max"
    group: Literal["sum", "max"] = "sum"

    def __post_init__(self):
        _check_int(self.name, "window", self.window, 1)
        _check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel={self.kernel} must be odd (the pooling keeps the length)")
        _check_choice(self.name, "pooling", self.pooling, ("max", "avg"))
        _check_choice(self.name, "group", self.group, ("sum", "max"))
        _set_budget(self, self.budget)

    def reserved(self, slots):
        return 0, self.window

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        _need(self.name, k=k, q=q, q_pos=q_pos)
        return S.snapkv_scores(
            q, q_pos, k, pos, valid, window=self.window, kernel=self.kernel, pooling=self.pooling, group=self.group
        )


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    """Heavy hitters + recent window (Zhang et al. 2023); see `scores.h2o_scores`.

    recent=None: half of the per-head budget (H2O's equal heavy / recent split).
    """

    name: ClassVar[str] = "h2o"
    budget: Budget | None = None
    recent: int | None = None

    def __post_init__(self):
        _check_int(self.name, "recent", self.recent, 0, allow_none=True)
        _set_budget(self, self.budget)
        if self.recent is None and isinstance(self.budget, Threshold):
            raise ValueError(f"{self.name}: a Threshold budget has no size to split; give recent= explicitly")

    def recent_for(self, slots: int) -> int:
        return per_head_count(self.budget, slots) // 2 if self.recent is None else self.recent

    def reserved(self, slots):
        return 0, self.recent_for(slots)

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        _need(self.name, k=k, q=q, q_pos=q_pos)
        return S.h2o_scores(q, q_pos, k, pos, valid, recent=self.recent_for(pos.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    """Read-time page selection (Tang et al. 2024); see `scores.quest_page_scores`.

    The budget counts pages: `Tokens(n)` selects max(1, n // page) pages per query (head),
    `KeepRatio(r)` floor(r * P) of the P pages; PerHead only. group=None selects per query head
    (the paper, multi-head); group="max" one page set per KV head from the max over its G query
    heads (WG-KV's integration, so the group reads one set of pages). Quest's evaluation code also
    keeps at least 3 pages and skips the first two layers; both are left to the caller.
    """

    name: ClassVar[str] = "quest"
    budget: Budget | None = None
    page: int = 16
    group: Literal["max"] | None = None

    def __post_init__(self):
        _check_int(self.name, "page", self.page, 1)
        _check_choice(self.name, "group", self.group, (None, "max"))
        _set_budget(self, self.budget)
        if not isinstance(self.budget, PerHead):
            raise ValueError(f"{self.name}: selects pages per query; the budget must be PerHead, got {self.budget!r}")

    def page_budget(self) -> Budget:
        size = self.budget.size
        return PerHead(Tokens(max(1, size.n // self.page))) if isinstance(size, Tokens) else self.budget

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        _need(self.name, k=k, q=q, q_pos=q_pos)
        s_btkgp = S.quest_page_scores(q, q_pos, k, pos, valid, page=self.page)
        return s_btkgp if self.group is None else jnp.max(s_btkgp, axis=3)

    def select(self, scores, valid=None, protect=None):
        """Page mask [.., P] (valid=None: the pages scored above -inf, i.e. readable)."""
        return select_mask(scores, valid, protect, self.page_budget())

    def keep(self, *, pos, valid, k=None, v=None, q=None, q_pos=None, protect=None):
        """The slots each query reads: its selected pages' valid keys at or before its position,
        [B, T, K, G, N] ([B, T, K, N] with group="max")."""
        pages = self.select(self.score(pos=pos, valid=valid, k=k, q=q, q_pos=q_pos), None, protect)
        sees_btkn = S.visible(q_pos, pos, valid).transpose(0, 2, 1, 3)
        sees = sees_btkn if self.group is not None else sees_btkn[:, :, :, None, :]
        return S.pages_to_slots(pages, self.page, pos.shape[-1]) & sees


@dataclasses.dataclass(frozen=True)
class KVzip(Policy):
    """Query-agnostic eviction by context reconstruction (Kim et al. 2025); see `scores.kvzip_scores`.

    Its scores come from a repeat pass: the model re-reads the context ("Repeat the previous
    context exactly." + the context, teacher-forced) with the cache read-only, in chunks of `chunk`
    context tokens, the later chunks' prompts carrying the previous chunk's last `carry` tokens.
    `wgkv_jax.cache.evict.kvzip_pass` runs it on the dual cache; `score` here is the per-chunk
    formula over given queries and keys. The default budget kind is `Global` (KVzip's "pair"
    level: one count over all layers and heads); pass budget=PerHead(...) for "pair-uniform".
    """

    name: ClassVar[str] = "kvzip"
    default_kind: ClassVar[type] = Global
    budget: Budget | None = None
    chunk: int = 2048
    carry: int = 8
    sinks: int = 4

    def __post_init__(self):
        _check_int(self.name, "chunk", self.chunk, 1)
        _check_int(self.name, "carry", self.carry, 0)
        _check_int(self.name, "sinks", self.sinks, 0)
        _set_budget(self, self.budget)

    def reserved(self, slots):
        return self.sinks, 0

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        _need(self.name, k=k, q=q, q_pos=q_pos)
        return S.kvzip_scores(q, q_pos, k, pos, valid, sinks=self.sinks)


@dataclasses.dataclass(frozen=True)
class WriteGate:
    """The WG-KV write gate as the admission stage of a `Chain` (it decides at write time which
    tokens enter the global store; the eviction stages then choose among the admitted ones).

    ckpt: what `wgkv_jax.load_gate` takes (None: the model's shipped gate; a gate.safetensors file
    or training directory; "all" / "none" / "random:<rate>"). tau: the admission threshold.
    """

    ckpt: str | None = None
    tau: float = 0.1

    def __post_init__(self):
        if not isinstance(self.tau, numbers.Real) or not 0.0 <= self.tau < 1.0:
            raise ValueError(f"WriteGate: tau={self.tau!r} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Protect:
    """Protect the first `sinks` and the last `recent` positions (a `Chain` stage; no budget)."""

    sinks: int = 0
    recent: int = 0

    def __post_init__(self):
        _check_int("Protect", "sinks", self.sinks, 0)
        _check_int("Protect", "recent", self.recent, 0)

    def mask(self, pos_bkn, valid_bkn) -> jax.Array:
        return S.first_positions(pos_bkn, valid_bkn, self.sinks) | S.last_positions(pos_bkn, valid_bkn, self.recent)


@dataclasses.dataclass(frozen=True)
class Chain(Policy):
    """Protect stages + eviction policies run in order (see the module docstring)."""

    name: ClassVar[str] = "chain"
    stages: tuple = ()

    def __post_init__(self):
        flat = []
        for stage in self.stages:
            flat.extend(stage.stages if isinstance(stage, Chain) else [stage])
        gates = [i for i, s in enumerate(flat) if isinstance(s, WriteGate)]
        if gates and gates != [0]:
            raise ValueError("Chain: a WriteGate (admission) may only be the first stage, and only one")
        for stage in flat[len(gates) :]:
            if isinstance(stage, Quest) or not isinstance(stage, Protect | Policy):
                raise ValueError(
                    f"Chain stage {stage!r} must be Protect(...) or an eviction policy "
                    "(Quest is read-time selection and does not chain)"
                )
        policies = [s for s in flat if isinstance(s, Policy)]
        if not policies:
            raise ValueError("Chain needs at least one eviction policy besides Protect stages")
        for stage in policies[:-1]:
            if isinstance(stage.budget, Global):
                raise ValueError(
                    f"Chain: only the last stage may have a Global budget; {stage.name} has {stage.budget!r}"
                )
        object.__setattr__(self, "stages", tuple(flat))

    @property
    def policies(self) -> tuple:
        return tuple(s for s in self.stages if isinstance(s, Policy))

    @property
    def admission(self) -> WriteGate | None:
        """The leading WriteGate stage, if any (admission at write time)."""
        return self.stages[0] if isinstance(self.stages[0], WriteGate) else None

    @property
    def budget(self) -> Budget:
        return self.policies[-1].budget

    def _reserved_with(self, stage: Policy, slots: int) -> tuple[int, int]:
        guards = [s for s in self.stages if isinstance(s, Protect)]
        sinks, recent = stage.reserved(slots)
        # sinks sit at the start and recent windows at the end, so each kind overlaps itself
        return max([sinks, *(g.sinks for g in guards)]), max([recent, *(g.recent for g in guards)])

    def reserved(self, slots):
        return self._reserved_with(self.policies[-1], slots)

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        guard_bkn = jnp.zeros(pos.shape, bool)
        for stage in self.stages:
            if isinstance(stage, Protect):
                guard_bkn = guard_bkn | stage.mask(pos, valid)
        alive_bkn = valid
        policies = self.policies
        for i, stage in enumerate(policies):
            s_bkn = stage.score(pos=pos, valid=alive_bkn, k=k, v=v, q=q, q_pos=q_pos)
            s_bkn = jnp.where(guard_bkn & alive_bkn, jnp.inf, s_bkn)
            if i == len(policies) - 1:
                return jnp.where(alive_bkn, s_bkn, -jnp.inf)
            check_reserved(
                f"chain stage {stage.name}", stage.budget, s_bkn.shape, *self._reserved_with(stage, pos.shape[-1])
            )
            alive_bkn = select_mask(s_bkn, alive_bkn, None, stage.budget)

    def select(self, scores, valid=None, protect=None):
        """The last stage's budget over `scores`; entries at -inf (non-survivors) are dropped."""
        alive = scores > -jnp.inf
        return super().select(scores, alive if valid is None else valid & alive, protect)


@dataclasses.dataclass(frozen=True)
class KVzipHeads(Policy):
    """KVzip's context-independent head-level mode (Kim et al. 2025, section 2.3 of
    reference/baselines.md): a head's score is the largest KVzip score it gave any context entry,
    computed once offline on calibration texts (`wgkv_jax.cache.evict.kvzip_head_scores`, max-pooled
    over the texts). At run time nothing is scored: the top floor(ratio * L * K) heads by that score
    keep their whole store, every other head keeps only its local window (DuoAttention-like, with
    a zero-length store). Ties go to the lower (layer, head) index. With unrolled layers, layers
    whose heads are all dropped shrink to the room left for decode (`PerLayerCache`).

    head_scores: [L][K] as nested tuples (hashable); ratio: the fraction of heads that keep their
    store (the paper recommends 0.6).
    """

    name: ClassVar[str] = "kvzip_heads"
    head_scores: tuple[tuple[float, ...], ...] = ()
    ratio: float = 0.6
    budget: Budget | None = None

    def __post_init__(self):
        scores = self.head_scores
        if not scores or any(len(row) != len(scores[0]) or not row for row in scores):
            raise ValueError(f"{self.name}: head_scores must be a non-empty [layers][kv_heads] table; got {scores!r}")
        object.__setattr__(self, "head_scores", tuple(tuple(float(x) for x in row) for row in scores))
        if isinstance(self.budget, KeepRatio):  # get("kvzip_heads", keep_ratio=r): r is the head ratio
            object.__setattr__(self, "ratio", self.budget.ratio)
        elif self.budget is not None and self.budget != Threshold(0.5):
            raise ValueError(f"{self.name}: the budget is ratio= (a fraction of the heads); got budget {self.budget!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0 < self.ratio <= 1:
            raise ValueError(f"{self.name}: ratio={self.ratio!r} must be in (0, 1]")
        object.__setattr__(self, "budget", Threshold(0.5))  # the 0/1 store scores below: keep the 1s

    def kept_heads(self):
        """Bool [L, K]: the heads that keep their store."""
        import numpy as np

        flat = np.asarray(self.head_scores, np.float64).ravel()
        n = max(1, int(np.floor(self.ratio * flat.size + 1e-9)))
        order = np.lexsort((np.arange(flat.size), -flat))  # highest first, ties to the lower index
        keep = np.zeros(flat.size, bool)
        keep[order[:n]] = True
        return keep.reshape(len(self.head_scores), -1)

    def store_scores(self, valid_lbkc):
        """1 for the valid entries of kept heads, 0 for the others' (`budget` keeps the 1s)."""
        keep_lk = jnp.asarray(self.kept_heads())
        if keep_lk.shape != (valid_lbkc.shape[0], valid_lbkc.shape[2]):
            raise ValueError(
                f"{self.name}: head_scores are for {keep_lk.shape[0]} layers x {keep_lk.shape[1]} KV heads; "
                f"this cache has {valid_lbkc.shape[0]} x {valid_lbkc.shape[2]}"
            )
        return jnp.where(valid_lbkc & keep_lk[:, None, :, None], 1.0, 0.0)

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        raise ValueError(f"{self.name} keeps or drops whole heads of the store: it has no per-entry score")


@dataclasses.dataclass(frozen=True)
class Cascading:
    """Cascading KV cache (Willette et al., arXiv 2406.17808): an *admission* policy with its own
    cache, not a scorer over the dual cache's store. S sinks + C circular cascades of W slots;
    cascade i accepts every 2^i-th token, and a declined token overwrites the cascade's newest
    entry when its attention EMA is at least as high (`wgkv_jax.cache.cascading`).

    The budget sizes the cache for a prompt of n tokens: KeepRatio(r) gives floor(r * n) slots,
    Tokens(t) gives t; W is the largest with S + C * W <= slots. `generate(policy="cascading",
    keep_ratio=r)` runs it (no write gate: it replaces the dual cache).
    """

    name: ClassVar[str] = "cascading"
    budget: Budget = None
    cascades: int = 4
    sinks: int = 4
    beta: float = 0.9999999
    positions: Literal["in_cache", "original"] = "in_cache"
    head_reduce: Literal["max", "mean"] = "max"

    def __post_init__(self):
        _set_budget(self, self.budget)
        if not isinstance(self.budget, PerHead):
            raise ValueError(f"cascading: budget {self.budget!r} must be KeepRatio, Tokens or PerHead (one size)")
        _check_int(self.name, "cascades", self.cascades, 1)
        _check_int(self.name, "sinks", self.sinks, 0)
        from wgkv_jax.cache.cascading import CascadeConfig

        CascadeConfig(window=1, cascades=self.cascades, sinks=self.sinks, beta=self.beta, positions=self.positions,
                      head_reduce=self.head_reduce)  # fmt: skip  # validates beta, positions, head_reduce

    def cache_config(self, n_tokens: int):
        """The `CascadeConfig` for an n-token prompt."""
        from wgkv_jax.cache.cascading import CascadeConfig

        size = self.budget.size
        slots = int(size.n) if isinstance(size, Tokens) else size.count(n_tokens)  # Tokens: as given, not capped
        return CascadeConfig.for_budget(
            slots, cascades=self.cascades, sinks=self.sinks, beta=self.beta, positions=self.positions,
            head_reduce=self.head_reduce,
        )  # fmt: skip


POLICIES: dict[str, type[Policy]] = {
    StreamingLLM.name: StreamingLLM,
    SnapKV.name: SnapKV,
    H2O.name: H2O,
    Quest.name: Quest,
    KVzip.name: KVzip,
    KVzipHeads.name: KVzipHeads,
    Cascading.name: Cascading,
}


def available() -> list[str]:
    """Names `get` accepts."""
    return sorted(POLICIES)


def get(name: str, *, keep_ratio: float | None = None, tokens: int | None = None, budget=None, **options) -> Policy:
    """The policy `name` with a budget and its options, e.g. `get("snapkv", keep_ratio=0.25, window=64)`.

    Args:
      name: one of `available()`.
      keep_ratio: KeepRatio(keep_ratio), kept / total in (0, 1], under the policy's default budget
        kind (PerHead; Global for KVzip).
      tokens: Tokens(tokens), entries kept per head (on average for Global).
      budget: any budget kind (PerLayer, Global, Threshold, ...); at most one of the three.
      **options: the policy's fields (window, kernel, sinks, recent, page, ...).

    Raises:
      ValueError: an unknown name or option, or a bad value (naming it).
    """
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; available policies: {available()}")
    cls = POLICIES[name]
    given = {k: v for k, v in (("keep_ratio", keep_ratio), ("tokens", tokens), ("budget", budget)) if v is not None}
    if len(given) > 1:
        raise ValueError(f"{name}: give one of keep_ratio=, tokens=, budget=; got {given}")
    if keep_ratio is not None:
        budget = KeepRatio(keep_ratio)
    elif tokens is not None:
        budget = Tokens(tokens)
    kind = getattr(cls, "default_kind", PerHead)
    if isinstance(budget, KeepRatio | Tokens) and kind is not PerHead:
        budget = kind(budget)
    fields = {f.name for f in dataclasses.fields(cls)} - {"budget"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; {name} takes {sorted(fields)}")
    return cls(budget=budget, **options)
