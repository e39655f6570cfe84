"""AhaKV eviction (Gu et al. 2025, arXiv 2506.03762): recent accumulation, a step gain, a value prior.

    policy = AhaKV(budget=Tokens(256))                  # recent = 128, gain "log", prior "l2"
    s_bkn = policy.score(pos=pos_bkn, valid=valid_bkn, k=k_bkne, v=v_bkne, q=q_btkge, q_pos=q_pos_bt)
    keep_bkn = policy.select(s_bkn, valid_bkn)          # exactly 256 per head, the last 128 always

    acc = policy.accumulator(slots=C)                   # decode: the last r rows over the C slots
    state = acc.init(batch=B, heads=K, slots=C)
    state = acc.observe(state, row_bkc, evicted_slot_bk)            # every step (jit-able)
    s_bkc = policy.decode_scores(state, pos=pos_bkc, valid=valid_bkc, v=v_bkce)

The diagnosis (the paper's): H2O scores key j by the attention it accumulated, S_j = sum_{i>=j} a_ij;
under the causal mask an early key is summed over more rows, so E[S_j] falls with j and the kept
tokens pile up at the start of the sequence. What we implement, and where each part comes from
(reference/baselines.md section 3; the paper body was not available, so only RA is the paper's):

- Recent accumulation, RA (the paper's): sum a key's attention over the last r query rows only,
  where r is also the recent budget, the r newest tokens kept unconditionally (as in H2O, the
  budget is r recent + B - r chosen by score). Every candidate then gets the same number of
  contributions, which removes the count bias. The paper writes the sum as i = n - r .. n (r + 1
  rows); we take the last r rows, SnapKV's observation window, so every candidate gets exactly r
  (the count is independent of j either way) and RA with no gain or prior is SnapKV's window vote
  before pooling. Query rows are taken as the last `recent` of the T given ones (the caller aligns
  rows to end together, e.g. left padding), as `scores.snapkv_scores` does.
- Step-gain softmax, SG (ours; the paper "adaptively tunes the scale of softmax according to the
  expectation of the information entropy", formula unverified): the scoring softmax of the query
  at position i uses the logits times lambda_i = max(1, log(i + 1) / log(ref_len)), the log-n
  "entropy-invariant" scale, 1 up to `ref_len` tokens and non-decreasing after (gain="log");
  gain="step" is the same gain held constant over octaves (lambda at the largest power of two
  <= i + 1); gain="none" is lambda = 1. The gain changes the eviction score only, never the
  model's attention.
- Value prior, V (ours; the paper "utilizes the information of value vectors", combination rule
  unverified): the score is multiplied by phi(v_j): "l2" = ||v_j||_2, "l2_normalized" = ||v_j||_2 /
  the mean norm over the head's valid keys (the same ranking within a head, comparable across heads
  for PerLayer / Global budgets), "none" = 1. A multiplicative prior, as kvpress's ExpectedAttention
  (use_vnorm) and CriticalKV combine attention with value magnitude.
- GQA (ours; the paper is multi-head): per query row the G heads of a KV group are summed ("sum"),
  averaged ("mean") or maxed ("max") before the sum over rows ("max" is the WG-KV integration's
  rule, as `snapkv_scores(group="max")`).

Ablations: RA only = AhaKV(gain="none", value_prior="none"); RA+SG = value_prior="none"; RA+SG+V =
the defaults. Defaults (ours): recent = half the per-head budget (H2O's equal recent / heavy
split, the lineage the paper fixes; at least 1, since the window is also the observation window),
gain "log" with ref_len 512 (lambda = 1.33 at 4K tokens, 1.67 at 32K), value prior "l2", group
"sum" (as SnapKV and H2O here).

Decode (reference/baselines.md 3.6, ours): `RecentAccumulator` keeps the last r attention rows over
the cache slots in a ring and their running sum, so the RA score of every slot is exact at every
step without recomputing attention; a slot whose occupant is evicted and reused has its column
cleared, so the newcomer starts from zero.

Axis letters: b batch, k KV head, g query head within a group, t query time, n key slot, c cache
slot (decode), r ring row (the last r steps), e head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from jax import lax

from wgkv_jax.policies.budgets import Budget, Threshold
from wgkv_jax.policies.policies import Policy, _check_choice, _check_int, _need, _set_budget, per_head_count
from wgkv_jax.policies.scores import attention_probs, last_positions

Gain = Literal["none", "log", "step"]
ValuePrior = Literal["none", "l2", "l2_normalized"]
Group = Literal["sum", "mean", "max"]
GAINS = ("none", "log", "step")
VALUE_PRIORS = ("none", "l2", "l2_normalized")
GROUPS = ("sum", "mean", "max")


# ----------------------------------------------------------------------------- math


def step_gain(q_pos_bt: jax.Array, *, gain: Gain = "log", ref_len: int = 512) -> jax.Array:
    """The SG logit gain lambda of each query, float32 shaped like `q_pos_bt` (see the module doc).

    lambda >= 1, non-decreasing in the position, 1 for positions < ref_len ("log": exactly 1 at
    position ref_len - 1, i.e. ref_len tokens seen). Padding queries (negative positions) get 1.
    """
    length = jnp.maximum(q_pos_bt.astype(jnp.int32) + 1, 1)
    if gain == "none":
        return jnp.ones(q_pos_bt.shape, jnp.float32)
    if gain == "log":
        log_len = jnp.log(length.astype(jnp.float32))
    elif gain == "step":
        octave = 31 - lax.clz(length)  # floor(log2(length)) in integers: exact at powers of two
        log_len = octave.astype(jnp.float32) * math.log(2.0)
    else:
        raise ValueError(f"gain={gain!r} must be one of {list(GAINS)}")
    return jnp.maximum(1.0, log_len / math.log(ref_len))


def sg_attention_probs(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, *, gain: Gain = "log", ref_len: int = 512):
    """Causal softmax of lambda_t * q . k / sqrt(E) over the keys each query sees: [B, K, G, T, N].

    `scores.attention_probs` with each query scaled by its gain (lambda q . k = (lambda q) . k);
    padding rows and unseen keys are exactly 0.
    """
    lam_bt = step_gain(q_pos_bt, gain=gain, ref_len=ref_len)
    q_btkge = q_btkge.astype(jnp.float32) * lam_bt[:, :, None, None, None]
    return attention_probs(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn)


def ahakv_rows(
    q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, *, gain: Gain = "log", ref_len: int = 512, group: Group = "sum"
) -> jax.Array:
    """SG attention of every given query row, reduced over the G heads of each group: [B, K, T, N].

    The rows RA sums: `ahakv_scores` over its window, `RecentAccumulator.observe` one per decode
    step (T = 1, then [:, :, 0]).
    """
    p_bkgtn = sg_attention_probs(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, gain=gain, ref_len=ref_len)
    if group == "sum":
        return jnp.sum(p_bkgtn, axis=2)
    if group == "mean":
        return jnp.mean(p_bkgtn, axis=2)
    if group == "max":
        return jnp.max(p_bkgtn, axis=2)
    raise ValueError(f"group={group!r} must be one of {list(GROUPS)}")


def value_prior_weight(v_bkne, valid_bkn, mode: ValuePrior = "l2") -> jax.Array:
    """phi(v_j), the multiplicative value prior: float32 [B, K, N] (0 on invalid slots for l2 modes)."""
    if mode == "none":
        return jnp.ones(valid_bkn.shape, jnp.float32)
    if mode not in VALUE_PRIORS:
        raise ValueError(f"value_prior={mode!r} must be one of {list(VALUE_PRIORS)}")
    norm_bkn = jnp.where(valid_bkn, jnp.linalg.norm(v_bkne.astype(jnp.float32), axis=-1), 0.0)
    if mode == "l2":
        return norm_bkn
    count_bk1 = jnp.maximum(jnp.sum(valid_bkn, axis=-1, keepdims=True), 1)
    mean_bk1 = jnp.sum(norm_bkn, axis=-1, keepdims=True) / count_bk1
    return norm_bkn / jnp.where(mean_bk1 > 0, mean_bk1, 1.0)  # all-zero values: phi = 0, no NaN


def _finish(acc_bkn, pos_bkn, valid_bkn, v_bkne, *, recent: int, value_prior: ValuePrior, protect: bool):
    """acc * phi(v); the last `recent` positions +inf (when protect); invalid -inf."""
    s_bkn = acc_bkn if value_prior == "none" else acc_bkn * value_prior_weight(v_bkne, valid_bkn, value_prior)
    if protect:
        s_bkn = jnp.where(last_positions(pos_bkn, valid_bkn, recent), jnp.inf, s_bkn)
    return jnp.where(valid_bkn, s_bkn, -jnp.inf)


def ahakv_scores(
    q_btkge,
    q_pos_bt,
    k_bkne,
    v_bkne,
    pos_bkn,
    valid_bkn,
    *,
    recent: int,
    gain: Gain = "log",
    ref_len: int = 512,
    value_prior: ValuePrior = "l2",
    group: Group = "sum",
    protect: bool = True,
) -> jax.Array:
    """AhaKV: RA over the last `recent` query rows of the SG softmax, times the value prior.

    Args:
      q_btkge, q_pos_bt: queries [B, T, K, G, E] and positions [B, T] (negative = padding); the last
        `recent` of the T query slots are the observation window (all T when T < recent).
      k_bkne, v_bkne, pos_bkn, valid_bkn: the keys to score, their values (ignored when
        value_prior="none", may then be None), positions and validity.
      recent: r, the window of query rows summed and of newest positions protected.
      gain, ref_len, value_prior, group: see the module docstring.
      protect: False leaves the window's keys with their RA score instead of +inf (the raw sum,
        for the reductions to H2O / SnapKV).

    Returns:
      float32 [B, K, N]: the last `recent` positions of each (row, head) +inf, invalid slots -inf,
      the rest sum_{t in window} rows[t, n] * phi(v_n) >= 0.
    """
    if isinstance(recent, bool) or not isinstance(recent, int) or recent < 1:
        raise ValueError(f"ahakv_scores: recent={recent!r} must be an integer >= 1 (the observation window)")
    if not isinstance(ref_len, int) or ref_len < 2:
        raise ValueError(f"ahakv_scores: ref_len={ref_len!r} must be an integer >= 2 (log(ref_len) > 0)")
    with jax.named_scope("ahakv_score"):
        q_btkge, q_pos_bt = q_btkge[:, -recent:], q_pos_bt[:, -recent:]
        rows_bktn = ahakv_rows(q_btkge, q_pos_bt, k_bkne, pos_bkn, valid_bkn, gain=gain, ref_len=ref_len, group=group)
        acc_bkn = jnp.sum(rows_bktn, axis=2)
        return _finish(acc_bkn, pos_bkn, valid_bkn, v_bkne, recent=recent, value_prior=value_prior, protect=protect)


# ----------------------------------------------------------------------------- decode bookkeeping


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RAState:
    """The decode-time RA state of one layer (a pytree).

    rows_bkrc [B, K, r, C]: the last r attention rows over the C slots; step t's row in ring row
    t mod r. sum_bkc [B, K, C]: their sum, the RA score of each slot. step []: rows observed.
    """

    rows_bkrc: jax.Array
    sum_bkc: jax.Array
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class RecentAccumulator:
    """Exact sliding sum of the last `recent` attention rows over a fixed set of cache slots.

    ::

        step t writes ring row t mod r:      r = 3        ring rows   0    1    2
            t = 0, 1, 2  fill rows 0, 1, 2                            t=3  t=1  t=2   (after t = 3)
            t = 3        row 0 leaves the sum (t = 0), t = 3 enters it

        evicted slot c at step t:  column c of every ring row and of the sum is zeroed first,
        then step t's row (over the slots as they are now, the newcomer in c) is added

    so sum[c] is the attention the current occupant of c received from the last r queries,
    the same as a recomputation from those rows (a row from before the occupant existed gives it 0).
    """

    recent: int

    def __post_init__(self):
        _check_int("RecentAccumulator", "recent", self.recent, 1)

    def init(self, *, batch: int, heads: int, slots: int) -> RAState:
        """An empty state: no rows observed, every slot's sum 0."""
        return RAState(
            rows_bkrc=jnp.zeros((batch, heads, self.recent, slots), jnp.float32),
            sum_bkc=jnp.zeros((batch, heads, slots), jnp.float32),
            step=jnp.zeros((), jnp.int32),
        )

    def observe(self, state: RAState, probs_bkc: jax.Array, evicted_slot_bk: jax.Array | None = None) -> RAState:
        """Add this step's row, drop the row r steps old, clear the evicted slot's column.

        Args:
          state: the layer's RAState.
          probs_bkc: float [B, K, C], this step's attention row over the slots (group-reduced,
            e.g. `ahakv_rows(q, q_pos, k, pos, valid, ...)[:, :, 0]`), after the new token was
            written into its slot.
          evicted_slot_bk: int [B, K], the slot whose occupant was evicted (and reused) this step,
            -1 (or any value outside [0, C)) for none; None for no eviction anywhere.

        Returns:
          the new RAState (same shapes and dtypes; jit-able, static shapes).
        """
        rows_bkrc, sum_bkc = state.rows_bkrc, state.sum_bkc
        if probs_bkc.shape != sum_bkc.shape:
            raise ValueError(f"RecentAccumulator.observe: probs shape {probs_bkc.shape} != the state's {sum_bkc.shape}")
        with jax.named_scope("ahakv_observe"):
            if evicted_slot_bk is not None:
                freed_bkc = jnp.arange(sum_bkc.shape[-1]) == evicted_slot_bk[..., None]
                rows_bkrc = jnp.where(freed_bkc[:, :, None, :], 0.0, rows_bkrc)
                sum_bkc = jnp.where(freed_bkc, 0.0, sum_bkc)
            slot = state.step % self.recent
            leaving_bkc = lax.dynamic_index_in_dim(rows_bkrc, slot, axis=2, keepdims=False)
            row_bkc = probs_bkc.astype(jnp.float32)
            rows_bkrc = lax.dynamic_update_index_in_dim(rows_bkrc, row_bkc, slot, axis=2)
            # the true sum is >= 0; the clamp removes the -1e-9 residue add / subtract leaves behind
            sum_bkc = jnp.maximum(sum_bkc - leaving_bkc + row_bkc, 0.0)
            return RAState(rows_bkrc, sum_bkc, state.step + 1)

    @staticmethod
    def recompute(state: RAState) -> jax.Array:
        """The sum recomputed from the stored rows, [B, K, C] (resyncs float drift if ever needed)."""
        return jnp.sum(state.rows_bkrc, axis=2)


# ----------------------------------------------------------------------------- the policy


@dataclasses.dataclass(frozen=True)
class AhaKV(Policy):
    """AhaKV (Gu et al. 2025): RA + SG gain + value prior; see the module docstring.

    recent=None: half the per-head budget (at least 1), H2O's split. score needs k, q, q_pos and,
    unless value_prior="none", v.
    """

    name: ClassVar[str] = "ahakv"
    budget: Budget | None = None
    recent: int | None = None
    gain: Gain = "log"
    ref_len: int = 512
    value_prior: ValuePrior = "l2"
    group: Group = "sum"

    def __post_init__(self):
        _check_int(self.name, "recent", self.recent, 1, allow_none=True)
        _check_int(self.name, "ref_len", self.ref_len, 2)
        _check_choice(self.name, "gain", self.gain, GAINS)
        _check_choice(self.name, "value_prior", self.value_prior, VALUE_PRIORS)
        _check_choice(self.name, "group", self.group, GROUPS)
        _set_budget(self, self.budget)
        if self.recent is None and isinstance(self.budget, Threshold):
            raise ValueError(f"{self.name}: a Threshold budget has no size to split; give recent= explicitly")

    def recent_for(self, slots: int) -> int:
        """r for `slots` key slots: `recent`, or half the per-head budget (at least 1)."""
        return max(1, per_head_count(self.budget, slots) // 2) if self.recent is None else self.recent

    def reserved(self, slots):
        return 0, self.recent_for(slots)

    def _need_v(self, v) -> None:
        if v is None and self.value_prior != "none":
            raise ValueError(
                f"{self.name}.score needs v= (values [B, K, N, E]) for value_prior={self.value_prior!r}; "
                "pass the values or value_prior='none'"
            )

    def score(self, *, pos, valid, k=None, v=None, q=None, q_pos=None):
        _need(self.name, k=k, q=q, q_pos=q_pos)
        self._need_v(v)
        return ahakv_scores(
            q,
            q_pos,
            k,
            v,
            pos,
            valid,
            recent=self.recent_for(pos.shape[-1]),
            gain=self.gain,
            ref_len=self.ref_len,
            value_prior=self.value_prior,
            group=self.group,
        )

    def rows(self, *, pos, valid, k, q, q_pos) -> jax.Array:
        """This policy's group-reduced SG rows [B, K, T, N] (one per query; T = 1 in decode)."""
        return ahakv_rows(q, q_pos, k, pos, valid, gain=self.gain, ref_len=self.ref_len, group=self.group)

    def accumulator(self, slots: int) -> RecentAccumulator:
        """The decode-time RA bookkeeping for a cache of `slots` slots per head."""
        return RecentAccumulator(self.recent_for(slots))

    def decode_scores(self, state: RAState, *, pos, valid, v=None) -> jax.Array:
        """Scores [B, K, C] of the cache slots from the accumulated RA: sum * phi(v), the last r
        positions +inf, invalid -inf (evict the argmin of the unprotected valid slots)."""
        self._need_v(v)
        recent = state.rows_bkrc.shape[2]
        return _finish(state.sum_bkc, pos, valid, v, recent=recent, value_prior=self.value_prior, protect=True)
